// The package surface: exports, constructor checks, configuration, HostBuffer.
import test from 'ava'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'
import * as esm from 'kvtransfer'
import { RDMACommunicator, HostBuffer, KVTransferError } from 'kvtransfer'
import { scratchDir } from './helpers/scratch.mjs'

const require = createRequire(import.meta.url)
const one = { layers: 1, blocks: 4, blockBytes: 64 }

function decodeWith(options, ptrs) {
  return new RDMACommunicator('decode', 0, 0, ptrs ?? [HostBuffer.alloc(256).ptr], [], 4, 64, 1, 0, options)
}

test('the package loads through import and require alike', (t) => {
  const cjs = require('kvtransfer')
  for (const name of ['RDMACommunicator', 'HostBuffer', 'KVTransferError']) {
    t.is(typeof esm[name], 'function', name)
    t.is(cjs[name], esm[name], name)
  }
})

test('without a binary for this platform, loading says which platform and which package', async (t) => {
  const { copyFileSync, writeFileSync, mkdirSync, readdirSync } = await import('node:fs')
  const { join } = await import('node:path')
  // The wrapper and the napi loader, with no binary beside them and no per-platform package to find.
  const dir = scratchDir(t, 'kvt-nobinary-')
  mkdirSync(join(dir, 'lib'))
  const modules = readdirSync(new URL('../lib', import.meta.url)).filter((f) => f.endsWith('.js')).map((f) => `lib/${f}`)
  for (const f of ['index.js', 'binding.js', ...modules]) copyFileSync(new URL(`../${f}`, import.meta.url), join(dir, f))
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'kvtransfer-copy', version: '0.1.0' }))
  const err = t.throws(() => require(join(dir, 'index.js')))
  const target = esm.platform()
  t.regex(target, /^linux-(x64|arm64)-(gnu|musl)$/)
  t.true(err.message.includes(`no native binary for this platform, ${target}`), err.message)
  t.true(err.message.includes(`kvtransfer-${target}`), err.message)
  t.truthy(err.cause, 'the loader\'s own errors are kept as the cause')
  // `kvtransfer info` still runs there, and says what is missing and what to do.
  copyFileSync(new URL('../cli.js', import.meta.url), join(dir, 'cli.js'))
  const { spawnSync } = await import('node:child_process')
  const info = spawnSync(process.execPath, [join(dir, 'cli.js'), 'info'], { encoding: 'utf8', env: { ...process.env, KVCACHE_TRANSPORT: 'tcp' } })
  t.is(info.status, 1, info.stderr)
  t.regex(info.stdout, new RegExp(`binary: not loaded: .*kvtransfer-${target}`))
  t.regex(info.stdout, /reinstall kvtransfer with optional dependencies/)
  t.regex(info.stdout, /KVCACHE_TRANSPORT\s+"tcp"/)
})

test("the README's example is examples/quickstart.mjs, exactly", async (t) => {
  const { readFileSync } = await import('node:fs')
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8')
  const block = readme.match(/exactly this[^\n]*\n\n```js\n([\s\S]*?)```/)
  t.truthy(block, 'the README shows the example')
  t.is(block[1], readFileSync(new URL('../examples/quickstart.mjs', import.meta.url), 'utf8'))
})

test('the CLI parses its arguments: --help, --version, and a clear error for anything else', async (t) => {
  const { spawnSync } = await import('node:child_process')
  const cli = (...args) => spawnSync(process.execPath, [fileURLToPath(new URL('../cli.js', import.meta.url)), ...args], { encoding: 'utf8' })
  const help = cli('--help')
  t.is(help.status, 0)
  t.regex(help.stdout, /usage: kvtransfer <command>[\s\S]*info \[--json\]/)
  t.is(cli('-v').stdout.trim(), require('kvtransfer/package.json').version)
  const json = cli('info', '--json')
  t.is(json.status, 0, json.stderr)
  t.is(JSON.parse(json.stdout).platform, esm.platform())
  for (const args of [[], ['bogus'], ['info', '--bogus']]) {
    const r = cli(...args)
    t.is(r.status, 2, args.join(' '))
    t.regex(r.stderr, /usage: kvtransfer/)
  }
})

test.serial('systemInfo reports versions, platform, binary, transports and flags bad settings', (t) => {
  const info = esm.systemInfo()
  t.is(info.version, require('kvtransfer/package.json').version)
  t.is(info.nativeVersion, info.version)
  t.is(info.platform, esm.platform())
  t.regex(info.binary, /kvtransfer[.-]linux-/)
  t.deepEqual(info.transports.map((x) => x.name), ['cuda-ipc', 'shm', 'rdma', 'tcp'])
  t.true(info.transports.find((x) => x.name === 'tcp').usable)
  t.is(info.settings.length, 20)
  process.env.KVCACHE_RDMA_GID_INDEX = 'three'
  process.env.KVCACHE_AUTH_TOKEN = 'a secret nobody may read here'
  try {
    const bad = esm.systemInfo().settings.find((s) => s.env === 'KVCACHE_RDMA_GID_INDEX')
    t.is(bad.value, 'three')
    t.regex(bad.error, /KVCACHE_RDMA_GID_INDEX="three"/)
    const token = esm.systemInfo().settings.find((s) => s.env === 'KVCACHE_AUTH_TOKEN')
    t.is(token.value, '<set>')
    t.false(JSON.stringify(esm.systemInfo()).includes('nobody may read'))
  } finally {
    delete process.env.KVCACHE_RDMA_GID_INDEX
    delete process.env.KVCACHE_AUTH_TOKEN
  }
})

test('HostBuffer: aligned memory, one view, freed safely', (t) => {
  const hb = HostBuffer.alloc(10000)
  t.is(typeof hb.ptr, 'bigint')
  t.is(hb.ptr % 4096n, 0n)
  t.is(hb.buffer.length, 10000)
  t.is(hb.byteLength, 10000)
  t.true(hb.buffer.every((b) => b === 0))
  hb.buffer[9999] = 42
  t.is(hb.buffer.at(-1), 42)
  hb.free()
  t.true(hb.freed)
  t.is(hb.buffer.length, 0, 'the buffer no longer reaches freed memory')
  hb.free()
  for (const bad of [0, -5, 1.5, NaN]) {
    t.is(t.throws(() => HostBuffer.alloc(bad), { instanceOf: KVTransferError }).code, 'INVALID_ARGUMENT')
  }
})

test('constructor arguments are checked', (t) => {
  const p = HostBuffer.alloc(256).ptr
  const cases = [
    [() => new RDMACommunicator('middle', 0, 0, [p], [], 4, 64), /role/],
    [() => new RDMACommunicator('decode', 0, 'abc', [p], [], 4, 64), /port/],
    [() => new RDMACommunicator('decode', 0, 70000, [p], [], 4, 64), /port/],
    [() => new RDMACommunicator('decode', 0, 0, [], [], 4, 64), /keyPtrs is empty/],
    [() => new RDMACommunicator('decode', 0, 0, [p], [p, p], 4, 64), /valuePtrs has 2 entries/],
    [() => new RDMACommunicator('decode', 0, 0, [-1n], [], 4, 64), /keyPtrs\[0\]/],
    [() => new RDMACommunicator('decode', 0, 0, [0], [], 4, 64), /null/],
    [() => new RDMACommunicator('decode', 0, 0, [p], [], 0, 64), /blockNumber/],
    [() => new RDMACommunicator('decode', 0, 0, [p], [], 4, 0), /blockBytes/],
    [() => new RDMACommunicator('prefill', 0, 0, [p], [], 4, 64, 2, 2), /prefillTpIdx 2/],
    [() => new RDMACommunicator('decode', 0, 0, [p], [], 4, 64, 1, 0, { keyScalePtrs: [p] }), /scaleBlockBytes is 0/],
  ]
  for (const [make, why] of cases) {
    const err = t.throws(make, { instanceOf: KVTransferError })
    t.is(err.code, 'INVALID_ARGUMENT', err.message)
    t.regex(err.message, why)
  }
})

test.serial('bad environment variables are errors that name the variable', (t) => {
  const cases = {
    KVCACHE_IB_TIMEOUT: '40',
    KVCACHE_RDMA_GID_INDEX: 'three',
    KVCACHE_RELAX_ORDERING: 'perhaps',
    KVCACHE_DEBUG: '2',
    KVCACHE_GDRCOPY_FLUSH_ENABLE: 'x',
    KVCACHE_TRANSPORT: 'pigeon',
    KVCACHE_RDMA_NICS: 'mlx5_0,,',
    KVCACHE_SOCKET_IFNAME: 'nosuchif9',
    KVCACHE_ERROR_FILE: '/nonexistent/dir/errors.log',
  }
  for (const [name, value] of Object.entries(cases)) {
    process.env[name] = value
    try {
      const err = t.throws(() => decodeWith(), { instanceOf: KVTransferError })
      t.is(err.code, 'CONFIG', `${name}: ${err.message}`)
      t.true(err.message.includes(name), `${name}: ${err.message}`)
    } finally {
      delete process.env[name]
    }
  }
})

test.serial('options override the environment and are checked the same way', (t) => {
  process.env.KVCACHE_TRANSPORT = 'pigeon'
  try {
    const c = decodeWith({ transport: 'tcp' })
    t.is(c.transport, 'tcp')
    c.close()
  } finally {
    delete process.env.KVCACHE_TRANSPORT
  }
  const err = t.throws(() => decodeWith({ ibTimeout: 99 }), { instanceOf: KVTransferError })
  t.is(err.code, 'CONFIG')
  t.regex(err.message, /KVCACHE_IB_TIMEOUT \(option ibTimeout\)/)
  t.regex(t.throws(() => decodeWith({ nonsense: 1 })).message, /unknown option "nonsense"/)
  // Options keep their types: a string where a number belongs is refused, not parsed.
  const typed = t.throws(() => decodeWith({ ibTimeout: '20' }))
  t.is(typed.code, 'CONFIG')
  t.regex(typed.message, /option ibTimeout must be a number/)
  t.regex(t.throws(() => decodeWith({ ibTimeout: 20.5 })).message, /KVCACHE_IB_TIMEOUT \(option ibTimeout\)=20\.5: expected a whole number/)
  t.regex(t.throws(() => decodeWith({ debug: 'yes' })).message, /option debug must be a boolean/)
  decodeWith({ rdmaNics: ['mlx5_0', 'mlx5_1'], debug: false, timeoutMs: 2500, stallTimeoutMs: 500 }).close()
  decodeWith({ answersTo: ['203.0.113.7:9000', '[2001:db8::7]:9000'] }).close()
  decodeWith({ answersTo: '203.0.113.7:9000,203.0.113.8:9000' }).close()
  const named = t.throws(() => decodeWith({ answersTo: ['decode.example:9000'] }))
  t.is(named.code, 'CONFIG')
  t.regex(named.message, /KVCACHE_ANSWERS_TO \(option answersTo\)=.*addresses with ports/)
  t.regex(t.throws(() => decodeWith({ answersTo: 9000 })).message, /option answersTo must be a string or an array of strings/)
  t.is(t.throws(() => decodeWith({ transport: 'rdma', rdmaNics: 'no-such-nic' })).code, 'UNAVAILABLE')
})

test('a kernel without RDMA is named as the cause, not as an errno', async (t) => {
  const { existsSync, readFileSync } = await import('node:fs')
  if (existsSync('/sys/class/infiniband')) return t.pass('this kernel has RDMA devices')
  const { systemInfo, rdmaDevices } = await import('kvtransfer')
  const cause = /this kernel has no RDMA devices \(\/sys\/class\/infiniband does not exist\)/
  let libibverbs = true
  try {
    rdmaDevices()
  } catch (err) {
    t.is(err.code, 'UNAVAILABLE')
    if (/libibverbs\.so\.1 is not installed/.test(err.message)) libibverbs = false
    else t.regex(err.message, cause)
    t.notRegex(err.message, /Function not implemented|os error/)
  }
  if (!libibverbs) {
    // .ci/rdma-tests.sh runs this test again once the Soft-RoCE VM has installed rdma-core's libraries here.
    t.not(process.env.KVTRANSFER_EXPECT_VERBS, '1', 'libibverbs.so.1 should be installed on this host')
    return t.pass('no libibverbs here: the without-verbs suite covers that message')
  }
  t.regex(systemInfo().rdma.error, cause)
  t.regex(systemInfo().transports.find((x) => x.name === 'rdma').detail, cause)
  t.regex(t.throws(() => decodeWith({ transport: 'rdma' })).message, cause)
  const { join } = await import('node:path')
  const file = join(scratchDir(t), 'debug.log')
  decodeWith({ debug: true, debugFile: file }).close()
  t.regex(readFileSync(file, 'utf8'), cause)
})

test('auto transport says what it picked in the debug log', async (t) => {
  const { readFileSync } = await import('node:fs')
  const { join } = await import('node:path')
  const file = join(scratchDir(t), 'debug.log')
  const c = decodeWith({ debug: true, debugFile: file, rdmaNics: 'no-such-nic' })
  t.is(c.transport, 'shm', 'a host-memory cache prefers shared memory, for peers on this host')
  c.close()
  t.regex(readFileSync(file, 'utf8'), /transport auto: .*using shm and tcp/)
})

test('a decode port in use is a clear error; asyncDispose closes', async (t) => {
  const a = decodeWith({})
  const err = t.throws(() => new RDMACommunicator('decode', 0, a.port, [HostBuffer.alloc(256).ptr], [], 4, 64, 1, 0, { errorFile: '/dev/null' }))
  t.regex(err.message, /cannot listen/)
  await a[Symbol.asyncDispose]()
  // The port is free again.
  const b = new RDMACommunicator('decode', 0, a.port, [HostBuffer.alloc(256).ptr], [], 4, 64)
  t.is(b.port, a.port)
  b.close()
})

test('native errors carry their code; anything else is INTERNAL, never a guess from the message', (t) => {
  // Thrown by the native layer itself: the code is a property of the error, the message has no prefix.
  const binding = require('../binding.js')
  const init = { role: 'decode', gpuIdx: 0, port: 0, keyPtrs: [HostBuffer.alloc(256).ptr], valuePtrs: [], keyScalePtrs: [], valueScalePtrs: [] }
  const args = { ...init, blockNumber: 4, blockBytes: 64, scaleBlockBytes: 0, prefillTpSize: 1, prefillTpIdx: 0, settings: { ibTimeout: 99 } }
  const native = t.throws(() => new binding.NativeCommunicator(args))
  t.false(native instanceof KVTransferError)
  t.is(native.code, 'CONFIG')
  t.regex(native.message, /^KVCACHE_IB_TIMEOUT \(option ibTimeout\)=99: /)
  const e = KVTransferError.from(Object.assign(new Error('no reply'), { code: 'TIMEOUT' }))
  t.is(e.code, 'TIMEOUT')
  t.is(e.message, 'no reply')
  t.true(e instanceof Error)
  const odd = KVTransferError.from(new Error('TIMEOUT: looks like a code but is not one'))
  t.is(odd.code, 'INTERNAL')
  t.truthy(odd.cause)
  t.is(KVTransferError.from(Object.assign(new Error('x'), { code: 'ENOENT' })).code, 'INTERNAL')
})
