/**
 * The peers of `kvtransfer bench`: Mooncake Transfer Engine and NIXL on the same workload, through the drivers
 * under `benches/peers/` (one per peer, Python, the peers' own wheels), run in a virtual environment this module
 * makes and fills on request. A driver prints one JSON object per line: rows in the shape of the bench's own,
 * and the sizes or variants that failed or cannot run here, with the reason.
 */
import { spawn, spawnSync } from 'node:child_process'
import { createWriteStream, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs'
import { homedir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import type { BenchRow, Workload } from './bench.js'

/**
 * The peers a run can name, with what their driver needs from the Python package registry (`cuda13`: instead,
 * where the CUDA driver is 13 or later).
 */
export const PEERS: Record<string, { driver: string; packages: string[]; cuda13?: string[]; noDeps?: boolean; hostOnly?: string }> = {
  // Its CPU wheel: its driver moves host memory only (the CUDA wheel would not import on a machine without CUDA).
  mooncake: {
    driver: 'mooncake-driver.py',
    packages: ['mooncake-transfer-engine-non-cuda==0.3.13.post1'],
    hostOnly: "its driver runs Mooncake's TCP transport on host memory only (its CUDA wheel, 98 MB, is not installed)",
  },
  // Installed without its dependencies: it needs numpy only, not torch (GPU rows allocate through the machine's).
  nixl: { driver: 'nixl-driver.py', packages: ['nixl-cu12==1.5.1'], cuda13: ['nixl-cu13==1.5.1'], noDeps: true },
}

/** The packages of `peer` for a CUDA driver of major version `cuda` (0: none). */
export function peerPackages(peer: string, cuda: number): string[] {
  const p = PEERS[peer]
  return cuda >= 13 && p.cuda13 ? p.cuda13 : p.packages
}
// numpy: a range, not a pin (the drivers use little of it, and each Python has its own wheels of it).
const COMMON = ['numpy>=1.26,<3']

/** Where the drivers and their environment are. */
export interface PeerSetup {
  /** The virtual environment (default `$XDG_CACHE_HOME/kvtransfer/peers`, else `~/.cache/kvtransfer/peers`). */
  venv?: string
  /** A folder of wheels to install from instead of the registry (a machine that reaches none). */
  wheels?: string
  /** Told what the setup is doing (it can take minutes the first time). */
  say?: (line: string) => void
  /**
   * The major version of the CUDA driver here (0 or absent: none), which picks a peer's CUDA build. Where set, the
   * environment also sees the machine's own packages (the GPU rows allocate through its PyTorch; where the
   * wheels come from `wheels`, numpy comes from there too).
   */
  cuda?: number
}

/** The bench's workload at the sizes it measured. */
export interface PeerWorkload extends Workload {
  sizes: number[]
  /** The least time the untimed calls take (the driver's default: 200 ms). */
  warmupMs?: number
  /** GPU memory (beside kvtransfer's CUDA IPC rows): the prefill's on GPU 0, the decode's on `decode`. */
  gpu?: { decode: number }
}

export interface PeerRun {
  rows: BenchRow[]
  skipped: Array<{ transport: string; blockBytes?: number; why: string }>
  failed: Array<{ transport: string; blockBytes: number; error: string }>
}

/** The drivers' folder: `benches/peers/` of the package (this file is `lib/bench-peers.js`). */
export const DRIVERS = join(__dirname, '..', 'benches', 'peers')

/** How long a driver may go without a line before it is taken for hung, and the longest an install may take. */
const STALL_MS = 600_000
const INSTALL_MS = 1_200_000

/** What a driver may stand beside: kvtransfer's transports. */
const COMPARES = new Set(['tcp', 'shm', 'cuda-ipc'])

function defaultVenv(): string {
  return join(process.env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'kvtransfer', 'peers')
}

/**
 * The environment for a peer's processes: ours without the settings of the peers' own libraries (`UCX_*`,
 * `MC_*`, `NIXL_*`, `PYTHON*`), which would change what a row measures behind its label; each driver sets the
 * ones its variants need.
 */
function peerEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^(UCX_|MC_|NIXL_|PYTHON)/.test(k)))
}

/**
 * The environment's Python, with every package `peers` need installed (once: what is installed is remembered in
 * the environment, with the Python it was installed for). Binary wheels only (no package's setup code runs).
 * Throws, with the reason, where no Python, venv or package can be had.
 */
export function preparePeers(peers: string[], setup: PeerSetup = {}): string {
  const venv = setup.venv ?? defaultVenv()
  const python = join(venv, 'bin', 'python')
  const say = setup.say ?? (() => {})
  const run = (cmd: string, args: string[], what: string): string => {
    const r = spawnSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], env: peerEnv(), timeout: INSTALL_MS, killSignal: 'SIGKILL' })
    if (r.error || r.status !== 0) {
      const detail = (r.error?.message ?? `${r.stderr}${r.stdout}`).trim().split('\n').slice(-3).join(' ')
      throw new Error(`${what} failed: ${detail}`)
    }
    return r.stdout
  }
  if (existsSync(venv) && !existsSync(join(venv, 'pyvenv.cfg'))) {
    if (readdirSync(venv).length > 0) throw new Error(`${venv} is not a Python virtual environment (it has no pyvenv.cfg): give an empty or new folder`)
  }
  const site = setup.cuda ? ['--system-site-packages'] : []
  if (!existsSync(python)) {
    say(`making a Python environment for the peers in ${venv}`)
    mkdirSync(venv, { recursive: true })
    run('python3', ['-m', 'venv', ...site, venv], 'python3 -m venv (Python 3.9 or later with its venv module is needed)')
  } else if (setup.cuda && !/^include-system-site-packages\s*=\s*true\s*$/im.test(readFileSync(join(venv, 'pyvenv.cfg'), 'utf8'))) {
    // Made on a run without GPU rows: opened to the machine's packages now (its PyTorch), what it holds kept.
    say(`letting ${venv} see this machine's Python packages (the GPU rows allocate through its PyTorch)`)
    run('python3', ['-m', 'venv', '--upgrade', ...site, venv], 'python3 -m venv --upgrade --system-site-packages')
  }
  // What was installed, and for which Python: a venv remade (or its Python upgraded) installs again.
  const version = run(python, ['-I', '-c', 'import sys; print(sys.version)'], `${python}`).trim()
  const marker = join(venv, 'kvtransfer-installed.json')
  let installed = new Set<string>()
  try {
    const m = JSON.parse(readFileSync(marker, 'utf8')) as { python?: unknown; packages?: unknown }
    if (m.python === version && Array.isArray(m.packages)) installed = new Set(m.packages.filter((p): p is string => typeof p === 'string'))
  } catch {
    // None yet, or unreadable: install.
  }
  const source = setup.wheels ? ['--no-index', '--find-links', setup.wheels] : []
  const remember = () => writeFileSync(marker, JSON.stringify({ python: version, packages: [...installed].sort() }))
  const pip = (packages: string[], noDeps: boolean, instead: string[] = []) => {
    // Another build of the same library (NIXL for the other CUDA) goes first: both install the same module.
    const other = instead.filter((p) => installed.has(p) && !packages.includes(p))
    if (other.length > 0) {
      say(`uninstalling ${other.join(', ')} for ${packages.join(', ')}`)
      run(python, ['-I', '-m', 'pip', 'uninstall', '--yes', '--quiet', ...other.map((p) => p.split('==')[0])], `pip uninstall ${other.join(' ')}`)
      for (const p of other) installed.delete(p)
      remember()
    }
    const missing = packages.filter((p) => !installed.has(p))
    if (missing.length === 0) return
    say(`installing ${missing.join(', ')}${setup.wheels ? ` from ${setup.wheels}` : ''}`)
    const flags = ['--disable-pip-version-check', '--quiet', '--only-binary=:all:', ...source, ...(noDeps ? ['--no-deps'] : [])]
    run(python, ['-I', '-m', 'pip', 'install', ...flags, ...missing], `pip install ${missing.join(' ')}`)
    for (const p of missing) installed.add(p)
    remember()
  }
  pip(COMMON, false)
  for (const name of peers) pip(peerPackages(name, setup.cuda ?? 0), PEERS[name].noDeps === true, [...PEERS[name].packages, ...(PEERS[name].cuda13 ?? [])])
  return python
}

/** Drivers still running, ended with this process (a bench stopped with Ctrl-C leaves none behind). */
const running = new Set<number>()
function endAll(): void {
  for (const pid of running) {
    try {
      process.kill(-pid, 'SIGKILL')
    } catch {
      // Already gone.
    }
  }
}
let hooked = false
function onSignal(signal: NodeJS.Signals): void {
  endAll()
  process.kill(process.pid, signal)
}
function endWithThisProcess(pid: number): void {
  running.add(pid)
  if (hooked) return
  hooked = true
  process.once('exit', endAll)
  for (const signal of ['SIGINT', 'SIGTERM'] as const) process.once(signal, onSignal)
}

/**
 * Runs one peer's driver on the workload: its rows (checked against the workload, their rates recomputed from
 * their times), and what it could not run and why. The driver's own output (the libraries log a lot) goes to
 * `log`.
 */
export async function runPeer(python: string, peer: string, w: PeerWorkload, log: string): Promise<PeerRun> {
  const out: PeerRun = { rows: [], skipped: [], failed: [] }
  // Isolated (no PYTHON* settings, no user site) and writing no bytecode beside the drivers.
  const args = ['-I', '-B', join(DRIVERS, PEERS[peer].driver), '--sizes', w.sizes.join(','), '--batch', `${w.batch}`, '--pool', `${w.pool}`, '--layers', `${w.layers}`]
  args.push('--tensors', `${w.tensors}`, '--iterations', `${w.iterations}`, '--warmup', `${w.warmup}`)
  if (w.warmupMs !== undefined) args.push('--warmup-ms', `${w.warmupMs}`)
  if (w.gpu) args.push('--gpu', '--decode-gpu', `${w.gpu.decode}`)
  const stderr = createWriteStream(log, { flags: 'a' })
  const opened = await new Promise<Error | undefined>((resolve) => {
    stderr.once('open', () => resolve(undefined))
    stderr.once('error', resolve)
  })
  if (opened) {
    out.skipped.push({ transport: peer, why: `cannot write its log ${log}: ${opened.message}` })
    return out
  }
  // A group of its own: a hung driver is ended with its decode children.
  const child = spawn(python, args, { stdio: ['ignore', 'pipe', stderr], detached: true, env: peerEnv() })
  if (child.pid !== undefined) endWithThisProcess(child.pid)
  let timer: NodeJS.Timeout | undefined
  const stall = () => {
    clearTimeout(timer)
    timer = setTimeout(() => {
      out.skipped.push({ transport: peer, why: `its driver printed nothing for ${STALL_MS / 1000} s and was stopped (its log: ${log})` })
      try {
        process.kill(-(child.pid as number), 'SIGKILL')
      } catch {
        // Already gone.
      }
    }, STALL_MS)
  }
  stall()
  const ended = new Promise<number | null>((resolve) => {
    child.once('error', (e) => {
      out.skipped.push({ transport: peer, why: `its driver could not start: ${e.message}` })
      resolve(null)
    })
    child.once('close', (code) => resolve(code))
  })
  const seen = new Set<string>()
  for await (const line of createInterface({ input: child.stdout })) {
    stall()
    let m: { row?: unknown; failed?: { transport?: unknown; blockBytes?: unknown; error?: unknown }; skipped?: { transport?: unknown; why?: unknown } }
    try {
      m = JSON.parse(line)
    } catch {
      continue
    }
    const row = m?.row === undefined ? undefined : checkedRow(m.row, peer, w)
    if (row && !seen.has(`${row.transport} ${row.blockBytes}`)) {
      seen.add(`${row.transport} ${row.blockBytes}`)
      out.rows.push(row)
    } else if (m?.failed && typeof m.failed.transport === 'string' && Number.isInteger(m.failed.blockBytes)) {
      out.failed.push({ transport: `${peer} ${m.failed.transport}`, blockBytes: m.failed.blockBytes as number, error: String(m.failed.error) })
    } else if (m?.skipped && typeof m.skipped.why === 'string') {
      out.skipped.push({ transport: typeof m.skipped.transport === 'string' ? `${peer} ${m.skipped.transport}` : peer, why: m.skipped.why })
    }
  }
  const code = await ended
  clearTimeout(timer)
  if (child.pid !== undefined) running.delete(child.pid)
  if (running.size === 0 && hooked) {
    hooked = false
    process.off('exit', endAll)
    for (const signal of ['SIGINT', 'SIGTERM'] as const) process.off(signal, onSignal)
  }
  stderr.end()
  if (code !== 0 && code !== null) out.skipped.push({ transport: peer, why: `its driver ended with exit code ${code} (its log: ${log})` })
  return out
}

/**
 * A driver's row, taken only where it is a row of this peer on this workload: its system is the peer's, its
 * size one asked for, its shape the workload's, and its rates are recomputed from its times here (a driver
 * cannot report a speed its times do not show, nor a row in kvtransfer's name).
 */
function checkedRow(r: unknown, peer: string, w: PeerWorkload): BenchRow | undefined {
  if (typeof r !== 'object' || r === null) return undefined
  const x = r as Record<string, unknown>
  const us = x.usPerCall as Record<string, unknown> | undefined
  const times = us && ['median', 'p10', 'p90'].map((k) => us[k])
  if (!times || !times.every((t) => typeof t === 'number' && Number.isFinite(t) && t > 0)) return undefined
  const [median, p10, p90] = times as number[]
  if (!(p10 <= median && median <= p90)) return undefined
  const blockBytes = x.blockBytes as number
  if (typeof x.transport !== 'string' || typeof x.verified !== 'boolean' || typeof x.compares !== 'string' || !COMPARES.has(x.compares)) return undefined
  if (!w.sizes.includes(blockBytes) || x.batch !== w.batch || x.calls !== w.iterations) return undefined
  // GPU rows from a GPU run only, host rows from a host run only.
  if ((x.compares === 'cuda-ipc') !== (w.gpu !== undefined)) return undefined
  const bytesPerCall = w.batch * blockBytes * w.tensors
  const gbps = (t: number) => bytesPerCall / (t * 1e3)
  return {
    system: peer,
    transport: x.transport,
    compares: x.compares,
    detail: typeof x.detail === 'string' ? x.detail : undefined,
    blockBytes,
    batch: w.batch,
    bytesPerCall,
    calls: w.iterations,
    gbps: { median: gbps(median), p10: gbps(p90), p90: gbps(p10) },
    usPerCall: { median, p10, p90 },
    verified: x.verified,
  }
}
