#!/usr/bin/env node
/**
 * `npx kvtransfer info [--json]`: what this machine offers kvtransfer. Exits 1 when a `KVCACHE_*` variable
 * holds a value a communicator would refuse.
 *
 * @packageDocumentation
 */
import { createRequire } from 'node:module'
import { writeFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import type { SystemInfo } from './index.js'
import { platform } from './lib/platform.js'

const usage = `usage: kvtransfer <command> [options]

commands:
  info [--json]   what this machine offers kvtransfer: platform, native binary, transports usable here and why
                  not the others, RDMA devices (ports, GIDs), GPUs and driver, the KVCACHE_* variables in force;
                  exits 1 when a KVCACHE_* value would be refused, or no native binary loads
  bench           the original's benchmark on every transport usable here: a decode in a second process,
                  N scattered blocks per writeCache call (one thread), each size warmed up, then timed; prints
                  median, p10 and p90 GB/s and µs per call, and checks the bytes of one write per size;
                  exits 1 when a check or a row fails, or nothing could be measured (a size whose two
                  caches would take over 70% of the free memory is left out, and said so)
    --transports t,t   which (default: every transport usable here; cuda-ipc moves GPU memory, the prefill's
                       cache on GPU 0 and the decode's on --decode-gpu, beside one device copy as its ceiling)
    --decode-gpu n     the decode's GPU in cuda-ipc rows (default 0; another GPU: copies between GPUs)
    --sizes k,k        block sizes in KiB (default 1,2,4,8,16,32,64,128,256)
    --batch n          blocks per call (default 1538)     --layers n      layers, written in turn (default 2)
    --iterations n     timed calls per row (default 20)   --warmup n      untimed calls first (default 3,
                                                          going on for 200 ms at least; 0: none)
    --key-only         keys only (an MLA cache)           --json, --csv   the rows in that form, nothing else
    --writers n        prefills writing into the decode at once, each its own connection (default 1)
    --plot FILE        the run as an SVG chart (GB/s against block size; needs: npm install vega vega-lite)
    --peers p,p        Mooncake and NIXL on the same workload (mooncake, nixl): their drivers run in a Python
                       environment made and filled from the Python package registry on first use
    --peers-venv DIR   that environment (default ~/.cache/kvtransfer/peers)
    --peer-wheels DIR  install the peers from a folder of wheels instead (a machine that reaches no registry)

  soak            mixed traffic for a while, checked and watched: decodes here and N prefills in other
                  processes run requests into them (most complete; some aborted, some losing their connection
                  mid-request, some revoked by the decode); every completed layer checked byte for byte; each
                  interval and at the end: requests by how they ended, calls, bytes, errors by code, write
                  p50/p99, and each side's memory, threads, descriptors, data connections, queue pairs and
                  registered regions; exits 1 on a byte that does not check, a request that never ends, growth
                  past a bound, or anything the decodes still hold once every prefill has gone
    --duration t       how long new requests start (default 60s; 500ms, 90s, 10m, 1h)
    --peers n          prefill communicators per process (default 4)    --interval t   between lines (default 10s)
    --prefills n       prefill processes (default 1)      --decodes n     decodes, each its own cache (default 1)
    --layers n         layers of a request (default 4)    --plot FILE     the footprint over time, as SVG
    --transport t      tcp, shm, rdma (default: the automatic choice)
    --seed n           the run's choices (default: from the clock; printed)   --json   the result at the end
    --chaos t          about this often, kill the prefill or the decode process (a new one takes its place) or
                       stop it for up to 2 s, at a random moment of its requests; a killed prefill's requests
                       must each end at the decode, a killed decode's at their prefill, and the next process's
                       complete (default: off; e.g. 1s)

options:
  -h, --help      this text
  -v, --version   the version of kvtransfer`

const version = (): string => (createRequire(__filename)('./package.json') as { version: string }).version

function gib(bytes: number): string {
  return `${(bytes / 2 ** 30).toFixed(1)} GiB`
}

function print(info: SystemInfo): void {
  const out: string[] = []
  out.push(`kvtransfer ${info.version} (native ${info.nativeVersion}) on ${info.platform}, Node.js ${info.node}`)
  out.push(`binary: ${info.binary ?? 'not found'}`)
  out.push('', 'transports:')
  for (const t of info.transports) out.push(`  ${t.name.padEnd(9)}${t.usable ? 'usable     ' : 'not usable '}${t.detail}`)
  out.push('', 'RDMA devices:')
  if (info.rdma.error) out.push(`  none: ${info.rdma.error}`)
  for (const d of info.rdma.devices) {
    if (d.ports.length === 0) out.push(`  ${d.name}: cannot be opened`)
    for (const p of d.ports) {
      out.push(`  ${d.name} port ${p.port}: ${p.state}, ${p.linkLayer}, MTU ${p.mtu}${p.linkLayer === 'InfiniBand' ? `, LID ${p.lid}` : ''}`)
      for (const g of p.gids) out.push(`    GID ${String(g.index).padStart(3)}  ${g.gid}`)
    }
  }
  out.push('', 'GPUs:')
  if (info.gpus.error) out.push(`  none: ${info.gpus.error}`)
  else out.push(`  CUDA driver ${info.gpus.driver}`)
  for (const g of info.gpus.devices) out.push(`  ${g.ordinal}: ${g.name}, ${gib(g.memoryBytes)}, compute ${g.computeCapability}`)
  out.push('', 'environment:')
  for (const s of info.settings) {
    const value = s.value === null ? '(unset)' : JSON.stringify(s.value)
    out.push(`  ${s.env.padEnd(30)}${value}${s.error ? `  BAD: ${s.error}` : ''}`)
  }
  console.log(out.join('\n'))
}

/** What `info` can say where the native binary does not load: which one it looked for, why, and the variables. */
function printWithoutBinary(err: unknown, json: boolean): void {
  const cause = err instanceof Error ? err.message : String(err)
  const settings = Object.entries(process.env)
    .filter(([k]) => k.startsWith('KVCACHE_'))
    .map(([env, value]) => ({ env, value: env === 'KVCACHE_AUTH_TOKEN' ? '<set>' : (value ?? null) }))
  if (json) {
    console.log(JSON.stringify({ version: version(), platform: platform(), node: process.versions.node, binary: null, error: cause, settings }, null, 2))
    return
  }
  const out = [`kvtransfer ${version()} on ${platform()}, Node.js ${process.versions.node}`, `binary: not loaded: ${cause}`]
  out.push('', 'Without it nothing moves, and transports, RDMA devices and GPUs cannot be looked at. The binary comes in')
  out.push(`the optional package kvtransfer-${platform()}: reinstall kvtransfer with optional dependencies (npm's`)
  out.push('--omit=optional or --no-optional leaves it out), or build it from source (`npm run build`).')
  out.push('', 'environment (not checked without the binary):')
  for (const s of settings) out.push(`  ${s.env.padEnd(30)}${JSON.stringify(s.value)}`)
  if (settings.length === 0) out.push('  no KVCACHE_* variable is set')
  console.log(out.join('\n'))
}

/** A whole number from an option, at least `min`. */
function count(name: string, text: string | undefined, min: number): number | undefined {
  if (text === undefined) return undefined
  const n = /^\d{1,9}$/.test(text) ? Number(text) : NaN
  if (!(n >= min)) throw new Error(`--${name} must be a whole number of at least ${min}, not ${JSON.stringify(text)}`)
  return n
}

/** Says what was wrong with the command line, then the usage; the exit code for it. */
function refused(err: unknown): number {
  console.error(`${err instanceof Error ? err.message : String(err)}\n\n${usage}`)
  return 2
}

/** A command's module, or undefined (and said why) where the native binary does not load. */
async function load<T>(importer: () => Promise<T>): Promise<T | undefined> {
  try {
    return await importer()
  } catch (err) {
    printWithoutBinary(err, false)
    return undefined
  }
}

type Plot = typeof import('./lib/plot.js')

/**
 * `--plot`'s module, with its packages looked for before a run that may take long, not after it: undefined
 * without `--plot`, null (said why) where they are absent.
 */
async function plotFor(command: string, file: string | boolean | undefined): Promise<Plot | undefined | null> {
  if (typeof file !== 'string') return undefined
  const plot = await import('./lib/plot.js')
  try {
    await plot.loadVega()
    return plot
  } catch (err) {
    console.error(`kvtransfer ${command} --plot: ${err instanceof Error ? err.message : String(err)}`)
    return null
  }
}

/** Writes the chart `svg` draws to `file`; false (said why) where it cannot be drawn or written. */
async function writePlot(command: string, file: string, svg: () => Promise<string>): Promise<boolean> {
  try {
    writeFileSync(file, await svg())
    return true
  } catch (err) {
    console.error(`kvtransfer ${command} --plot: ${err instanceof Error ? err.message : String(err)}`)
    return false
  }
}

const SOAK_OPTIONS = ['duration', 'interval', 'transport', 'seed', 'chaos', 'prefills', 'decodes']
/** Options both commands take. */
const SHARED_OPTIONS = ['peers', 'layers', 'plot']

/** `90s`, `10m`, `500ms`, `1h` (a bare number is seconds), in milliseconds. */
function duration(name: string, text: string | undefined): number | undefined {
  if (text === undefined) return undefined
  const m = /^(\d{1,7})(ms|s|m|h)?$/.exec(text)
  const unit: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }
  const ms = m ? Number(m[1]) * unit[m[2] ?? 's'] : NaN
  // At most a day: longer does not fit a timer.
  if (!(ms >= 1 && ms <= 86_400_000)) throw new Error(`--${name} must be a duration from 1ms to 24h such as 500ms, 90s, 10m or 1h, not ${JSON.stringify(text)}`)
  return ms
}

async function soak(values: Record<string, string | boolean | undefined>): Promise<number> {
  let options
  try {
    const transport = values.transport as string | undefined
    if (transport !== undefined && !['tcp', 'shm', 'rdma'].includes(transport)) throw new Error(`--transport must be tcp, shm or rdma, not ${JSON.stringify(transport)}`)
    options = {
      durationMs: duration('duration', values.duration as string | undefined),
      intervalMs: duration('interval', values.interval as string | undefined),
      peers: count('peers', values.peers as string | undefined, 1),
      prefills: count('prefills', values.prefills as string | undefined, 1),
      decodes: count('decodes', values.decodes as string | undefined, 1),
      layers: count('layers', values.layers as string | undefined, 2),
      seed: count('seed', values.seed as string | undefined, 0),
      transport: transport as 'tcp' | undefined,
      chaosMs: duration('chaos', values.chaos as string | undefined),
    }
    if (options.chaosMs !== undefined && options.chaosMs < 100) throw new Error('--chaos must be at least 100ms')
    if ((options.peers ?? 0) > 64) throw new Error('--peers must be at most 64')
    if ((options.prefills ?? 0) > 32) throw new Error('--prefills must be at most 32')
    if ((options.decodes ?? 0) > 16) throw new Error('--decodes must be at most 16')
    if ((options.layers ?? 0) > 64) throw new Error('--layers must be at most 64')
    if (options.chaosMs !== undefined && (options.prefills ?? 1) > 1) throw new Error('--chaos kills and stops the prefill process: it runs with one (--prefills 1)')
    if ((options.intervalMs ?? 10_000) * 2 > (options.durationMs ?? 60_000)) throw new Error('--interval must be at most half of --duration (growth is judged between samples taken while traffic runs)')
  } catch (err) {
    return refused(err)
  }
  const soakModule = await load(() => import('./lib/soak.js'))
  if (!soakModule) return 1
  const { runSoak, formatSample, chaosMinDurationMs } = soakModule
  const plot = await plotFor('soak', values.plot)
  if (plot === null) return 2
  if (options.chaosMs !== undefined && (options.durationMs ?? 60_000) < chaosMinDurationMs(options.chaosMs)) {
    return refused(new Error(`--chaos needs a --duration of at least ${Math.ceil(chaosMinDurationMs(options.chaosMs) / 1000)}s (chaos stops in time for the last prefill to serve)`))
  }
  const seed = options.seed ?? Date.now() % 2 ** 31
  const prefills = options.prefills ?? 1
  const decodes = options.decodes ?? 1
  const plural = (n: number, one: string, many = `${one}s`) => `${n} ${n === 1 ? one : many}`
  const what = `${plural(prefills, 'prefill process', 'prefill processes')} of ${plural(options.peers ?? 4, 'communicator')} into ${plural(decodes, 'decode')} for ${((options.durationMs ?? 60_000) / 1000).toFixed(0)} s${options.transport ? ` over ${options.transport}` : ''}, seed ${seed}`
  if (!values.json) console.log(`kvtransfer soak: ${what}`)
  const result = await runSoak({ ...options, seed, onSample: values.json ? undefined : (s) => console.log(formatSample(s)) })
  const counts = (r: Record<string, number>) => Object.entries(r).map(([k, v]) => `${k} ${v}`).join(', ') || 'none'
  if (values.json) console.log(JSON.stringify({ seed, ...result }, null, 2))
  else {
    const p99 = Math.max(...result.samples.map((s) => s.latencyUs?.p99 ?? 0))
    const peak = (side: 'decode' | 'prefill') => Math.max(...result.samples.map((s) => s[side]?.peakRssBytes ?? 0)) / 2 ** 20
    console.log(`in all: requests ${counts(result.requests)}; ${result.calls} calls, ${(result.bytes / 1e9).toFixed(2)} GB; errors ${counts(result.errors)}`)
    console.log(`  worst interval's write p99 ${p99.toFixed(0)} µs; peak memory decode ${peak('decode').toFixed(0)} MiB, prefill ${peak('prefill').toFixed(0)} MiB`)
    const c = result.chaos
    if (c) {
      const ms = (x: { p50: number; max: number } | null, what: string) => (x ? `; ${what} ${x.p50} ms after its kill (p50), ${x.max} ms at most` : '')
      console.log(`  chaos on the prefill: ${c.kills} kills, ${c.stops} stops; a killed prefill's requests ended at the decode ${counts(c.killedRequests)}${ms(c.endedAfterKillMs, 'the last of them ended')}`)
      console.log(
        `  chaos on the decode: ${c.decodeKills} kills, ${c.decodeStops} stops; a killed decode's requests ended at their prefill ${counts(c.lostRequests)}${ms(c.prefillEndedAfterDecodeKillMs, 'the last of them ended')}${ms(c.servingAgainAfterDecodeKillMs, 'a request completed on the next decode')}`,
      )
    }
    console.log(result.failures.length === 0 ? 'passed: every completed layer checked, every request ended, no growth past the bounds' : `FAILED:\n  ${result.failures.slice(0, 20).join('\n  ')}`)
  }
  if (plot && !(await writePlot('soak', values.plot as string, () => plot.svgOf(plot.soakSpec(result, what))))) return 1
  return result.failures.length === 0 ? 0 : 1
}

const BENCH_OPTIONS = ['csv', 'transports', 'sizes', 'batch', 'layers', 'iterations', 'warmup', 'key-only', 'writers', 'decode-gpu', 'peers', 'peers-venv', 'peer-wheels', 'plot']

/** A progress display on standard error: a bar redrawn in place on a terminal, a line per step elsewhere. */
function progress(): (what: string, done: number, total: number) => void {
  const tty = process.stderr.isTTY === true
  return (what, done, total) => {
    if (!tty) {
      if (what !== 'done') process.stderr.write(`  [${done + 1}/${total}] ${what}\n`)
      return
    }
    const width = 24
    const filled = Math.round((width * done) / Math.max(1, total))
    process.stderr.write(`\r\x1b[2K[${'#'.repeat(filled)}${'-'.repeat(width - filled)}] ${done}/${total} ${what === 'done' ? '' : what}`)
    if (what === 'done') process.stderr.write('\r\x1b[2K')
  }
}

async function bench(values: Record<string, string | boolean | undefined>): Promise<number> {
  const list = (v: string | boolean | undefined) => (typeof v === 'string' ? v.split(',').map((x) => x.trim()).filter(Boolean) : undefined)
  let options
  try {
    if (values.json && values.csv) throw new Error('--json and --csv: give one')
    if (list(values.transports)?.length === 0) throw new Error('--transports names none')
    if (typeof values.peers === 'string' && /^\d+$/.test(values.peers)) throw new Error('--peers of bench names peers (mooncake,nixl); a number of prefills is an option of soak')
    const sizes = list(values.sizes)?.map((k) => count('sizes', k, 1) as number * 1024)
    options = {
      transports: list(values.transports),
      sizes,
      batch: count('batch', values.batch as string | undefined, 1),
      layers: count('layers', values.layers as string | undefined, 1),
      iterations: count('iterations', values.iterations as string | undefined, 1),
      warmup: count('warmup', values.warmup as string | undefined, 0),
      writers: count('writers', values.writers as string | undefined, 1),
      decodeGpu: count('decode-gpu', values['decode-gpu'] as string | undefined, 0),
      keyOnly: values['key-only'] === true,
      peers: list(values.peers),
      peerSetup: { venv: values['peers-venv'] as string | undefined, wheels: values['peer-wheels'] as string | undefined },
    }
    if (options.peers?.length === 0) throw new Error('--peers names none')
  } catch (err) {
    return refused(err)
  }
  const bench = await load(() => import('./lib/bench.js'))
  if (!bench) return 1
  const { runBench, formatCsv, formatTable } = bench
  const quiet = values.json === true || values.csv === true
  const plot = await plotFor('bench', values.plot)
  if (plot === null) return 2
  let result
  try {
    result = await runBench({
      ...options,
      // Progress on standard error, so that standard output holds the table (or the JSON, CSV) alone.
      onProgress: quiet ? undefined : progress(),
      peerSetup: { ...options.peerSetup, say: quiet ? undefined : (line: string) => process.stderr.write(`  ${line}\n`) },
    })
  } catch (err) {
    return refused(err)
  }
  if (values.json) console.log(JSON.stringify(result, null, 2))
  else if (values.csv) console.log(formatCsv(result))
  else console.log(formatTable(result))
  // The run is printed first: a plot that cannot be written loses nothing else.
  if (plot && !(await writePlot('bench', values.plot as string, () => plot.svgOf(plot.benchSpec(result))))) return 1
  // Judged on kvtransfer's own rows: a peer that failed is said in the output, not a failure of ours.
  const ours = result.rows.filter((r) => r.system === 'kvtransfer')
  const oursFailed = result.failed.filter((f) => !(options.peers ?? []).some((p) => f.transport.startsWith(`${p} `)))
  if (ours.length === 0 && oursFailed.length === 0) console.error('nothing was measured: no transport asked for is usable here')
  return ours.length > 0 && oursFailed.length === 0 && ours.every((r) => r.verified) ? 0 : 1
}

async function main(args: string[]): Promise<number> {
  let parsed
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      options: {
        json: { type: 'boolean' },
        csv: { type: 'boolean' },
        transports: { type: 'string' },
        sizes: { type: 'string' },
        batch: { type: 'string' },
        layers: { type: 'string' },
        iterations: { type: 'string' },
        warmup: { type: 'string' },
        writers: { type: 'string' },
        'decode-gpu': { type: 'string' },
        'key-only': { type: 'boolean' },
        peers: { type: 'string' },
        'peers-venv': { type: 'string' },
        'peer-wheels': { type: 'string' },
        plot: { type: 'string' },
        duration: { type: 'string' },
        interval: { type: 'string' },
        transport: { type: 'string' },
        seed: { type: 'string' },
        chaos: { type: 'string' },
        prefills: { type: 'string' },
        decodes: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
        version: { type: 'boolean', short: 'v' },
      },
    })
  } catch (err) {
    return refused(err)
  }
  const { values, positionals } = parsed
  if (values.help) {
    console.log(usage)
    return 0
  }
  if (values.version) {
    console.log(version())
    return 0
  }
  if (positionals.length === 1 && positionals[0] === 'bench') {
    const misplaced = SOAK_OPTIONS.find((o) => values[o as keyof typeof values] !== undefined)
    if (misplaced) {
      console.error(`--${misplaced} is an option of soak\n\n${usage}`)
      return 2
    }
    return bench(values)
  }
  if (positionals.length === 1 && positionals[0] === 'soak') {
    const misplaced = BENCH_OPTIONS.find((o) => !SHARED_OPTIONS.includes(o) && values[o as keyof typeof values] !== undefined)
    if (misplaced) {
      console.error(`--${misplaced} is an option of bench\n\n${usage}`)
      return 2
    }
    return soak(values)
  }
  const misplaced = [...BENCH_OPTIONS, ...SOAK_OPTIONS].find((o) => values[o as keyof typeof values] !== undefined)
  if (misplaced) {
    console.error(`--${misplaced} is an option of ${SOAK_OPTIONS.includes(misplaced) ? 'soak' : 'bench'}\n\n${usage}`)
    return 2
  }
  if (positionals.length !== 1 || positionals[0] !== 'info') {
    console.error(positionals.length === 0 ? usage : `unknown command ${JSON.stringify(positionals.join(' '))}\n\n${usage}`)
    return 2
  }
  let info: SystemInfo
  try {
    info = (await import('./index.js')).systemInfo()
  } catch (err) {
    printWithoutBinary(err, values.json === true)
    return 1
  }
  if (values.json) console.log(JSON.stringify(info, null, 2))
  else print(info)
  return info.settings.some((s) => s.error) ? 1 : 0
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (err) => {
    console.error(`kvtransfer: ${err instanceof Error ? err.message : String(err)}`)
    process.exitCode = 1
  },
)
