// Structured logs: every line routed to onLog with its level and fields, in place of standard error, and JSON
// lines (logFormat: 'json') that parse, each field a key of its own.
import test from 'ava'
import { execFile } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { networkInterfaces } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Communicator, HostBuffer, KVTransferError } from 'kvtransfer'
import { scratchDir } from './helpers/scratch.mjs'

const child = fileURLToPath(new URL('./helpers/log-child.mjs', import.meta.url))
const cache = () => ({ keys: [HostBuffer.alloc(4096)], values: [HostBuffer.alloc(4096)], blockNumber: 4, blockBytes: 1024, transport: 'tcp' })
const token = 'a-token-of-at-least-32-characters-00000000'

test('onLog gets each level with its fields, and standard error gets nothing', async (t) => {
  const { stdout, stderr } = await new Promise((resolve, reject) =>
    execFile(process.execPath, [child], { env: { ...process.env, KVCACHE_DEBUG: '' }, timeout: 60_000 }, (e, stdout, stderr) =>
      e ? reject(Object.assign(e, { stderr })) : resolve({ stdout, stderr })),
  )
  const { refused, records, warnings } = JSON.parse(stdout)
  t.is(refused, 'UNAUTHENTICATED')
  // The decode's refusal: an error, about the prefill's host, with the code.
  const refusal = records.find((r) => r.level === 'error' && /refused a handshake/.test(r.message))
  t.truthy(refusal, JSON.stringify(records.map((r) => [r.level, r.message])))
  t.like(refusal.fields, { comm: 'decode:0', peer: '127.0.0.1' })
  t.is(typeof refusal.fields.pid, 'number')
  t.true(refusal.time > Date.now() - 60_000 && refusal.time <= Date.now())
  // The prefill with debug on: its steps, as debug lines.
  t.true(records.some((r) => r.level === 'debug' && r.fields.comm === 'prefill:0' && /connected to 127\.0\.0\.1/.test(r.message)))
  // Only communicators with debug on say debug lines.
  t.false(records.some((r) => r.level === 'debug' && r.fields.comm === 'decode:0'))
  const open = Object.values(networkInterfaces()).flat().some((i) => i && !i.internal && i.family === 'IPv4')
  if (open) t.true(records.some((r) => r.level === 'warn' && /without KVCACHE_AUTH_TOKEN/.test(r.message)), 'a warning')
  // A hook that throws is a process warning, not a crash.
  t.true(warnings.some((w) => /onLog threw: the hook broke/.test(w)), JSON.stringify(warnings))
  // Nothing else on standard error: the lines went to the hooks.
  t.deepEqual(stderr.split('\n').filter((l) => l && !/KVTRANSFER_ON_LOG|^\(Use `node/.test(l)), [])
})

test("logFormat: 'json' writes lines that parse, each field a key", async (t) => {
  const dir = scratchDir(t, 'kvt-logs-')
  const errorFile = join(dir, 'error.log')
  const decode = Communicator.decode({ ...cache(), socketIfname: 'lo', authToken: token, logFormat: 'json', errorFile })
  const stranger = Communicator.prefill({ ...cache(), reconnect: { retries: 0 } })
  await t.throwsAsync(stranger.connect('127.0.0.1', decode.port), { code: 'UNAUTHENTICATED' })
  await stranger.close()
  await decode.close()
  const lines = readFileSync(errorFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l))
  const refusal = lines.find((l) => /refused a handshake/.test(l.message))
  t.truthy(refusal, JSON.stringify(lines))
  t.like(refusal, { level: 'ERROR', target: 'kvtransfer', comm: 'decode:0', peer: '127.0.0.1' })
  t.is(refusal.pid, process.pid)
})

test('a bad logFormat or onLog is refused', (t) => {
  t.throws(() => Communicator.prefill({ ...cache(), logFormat: 'xml' }), { instanceOf: KVTransferError, code: 'CONFIG', message: /KVCACHE_LOG_FORMAT/ })
  t.throws(() => Communicator.prefill({ ...cache(), onLog: 'console' }), { instanceOf: KVTransferError, code: 'INVALID_ARGUMENT', message: /onLog/ })
})
