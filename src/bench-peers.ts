/**
 * The peers of `kvtransfer bench`: Mooncake Transfer Engine and NIXL on the same workload, through the drivers
 * under `benches/peers/` (one per peer, Python, the peers' own wheels), run in a virtual environment this module
 * makes and fills on request. A driver prints one JSON object per line: rows in the shape of the bench's own,
 * and the sizes or variants that failed or cannot run here, with the reason.
 */
import { spawn, spawnSync } from 'node:child_process'
import { createWriteStream, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { homedir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import type { BenchRow, Workload } from './bench.js'

/** The peers a run can name, with what their driver needs from the Python package registry. */
export const PEERS: Record<string, { driver: string; packages: string[]; noDeps?: boolean }> = {
  // Its CPU wheel: the bench moves host memory (the CUDA wheel would not import on a machine without CUDA).
  mooncake: { driver: 'mooncake-driver.py', packages: ['mooncake-transfer-engine-non-cuda==0.3.13.post1'] },
  // Installed without its dependencies: it needs numpy only, not torch.
  nixl: { driver: 'nixl-driver.py', packages: ['nixl-cu12==1.5.1'], noDeps: true },
}
const COMMON = ['numpy>=1.26']

/** Where the drivers and their environment are. */
export interface PeerSetup {
  /** The virtual environment (default `$XDG_CACHE_HOME/kvtransfer/peers`, else `~/.cache/kvtransfer/peers`). */
  venv?: string
  /** A folder of wheels to install from instead of the registry (a machine that reaches none). */
  wheels?: string
  /** Told what the setup is doing (it can take minutes the first time). */
  say?: (line: string) => void
}

/** The bench's workload at the sizes it measured. */
export interface PeerWorkload extends Workload {
  sizes: number[]
}

export interface PeerRun {
  rows: BenchRow[]
  skipped: Array<{ transport: string; blockBytes?: number; why: string }>
  failed: Array<{ transport: string; blockBytes: number; error: string }>
}

/** The drivers' folder: `benches/peers/` of the package (this file is `lib/bench-peers.js`). */
export const DRIVERS = join(__dirname, '..', 'benches', 'peers')

/** How long a driver may go without a line before it is taken for hung. */
const STALL_MS = 600_000

function defaultVenv(): string {
  return join(process.env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'kvtransfer', 'peers')
}

/**
 * The environment's Python, with every package `peers` need installed (once: what is installed is remembered in
 * the environment). Throws, with the reason, where no Python, venv or package can be had.
 */
export function preparePeers(peers: string[], setup: PeerSetup = {}): string {
  const venv = setup.venv ?? defaultVenv()
  const python = join(venv, 'bin', 'python')
  const say = setup.say ?? (() => {})
  const run = (cmd: string, args: string[], what: string) => {
    const r = spawnSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] })
    if (r.error || r.status !== 0) {
      const detail = (r.error?.message ?? `${r.stderr}${r.stdout}`).trim().split('\n').slice(-3).join(' ')
      throw new Error(`${what} failed: ${detail}`)
    }
  }
  if (!existsSync(python)) {
    say(`making a Python environment for the peers in ${venv}`)
    mkdirSync(venv, { recursive: true })
    run('python3', ['-m', 'venv', venv], 'python3 -m venv (Python 3.9 or later with its venv module is needed)')
  }
  const marker = join(venv, 'kvtransfer-installed.json')
  const installed = new Set<string>(existsSync(marker) ? (JSON.parse(readFileSync(marker, 'utf8')) as string[]) : [])
  const source = setup.wheels ? ['--no-index', '--find-links', setup.wheels] : []
  const pip = (packages: string[], noDeps: boolean) => {
    const missing = packages.filter((p) => !installed.has(p))
    if (missing.length === 0) return
    say(`installing ${missing.join(', ')}${setup.wheels ? ` from ${setup.wheels}` : ''}`)
    run(python, ['-m', 'pip', 'install', '--disable-pip-version-check', '--quiet', ...source, ...(noDeps ? ['--no-deps'] : []), ...missing], `pip install ${missing.join(' ')}`)
    for (const p of missing) installed.add(p)
    writeFileSync(marker, JSON.stringify([...installed].sort()))
  }
  pip(COMMON, false)
  for (const name of peers) pip(PEERS[name].packages, PEERS[name].noDeps === true)
  return python
}

/**
 * Runs one peer's driver on the workload: its rows, and what it could not run and why. The driver's own output
 * (the libraries log a lot) goes to `log`.
 */
export async function runPeer(python: string, peer: string, w: PeerWorkload, log: string): Promise<PeerRun> {
  const out: PeerRun = { rows: [], skipped: [], failed: [] }
  const args = [join(DRIVERS, PEERS[peer].driver), '--sizes', w.sizes.join(','), '--batch', `${w.batch}`, '--pool', `${w.pool}`, '--layers', `${w.layers}`]
  args.push('--tensors', `${w.tensors}`, '--iterations', `${w.iterations}`, '--warmup', `${w.warmup}`)
  const stderr = createWriteStream(log, { flags: 'a' })
  await new Promise((r) => stderr.once('open', r))
  // A group of its own: a hung driver is ended with its decode children.
  const child = spawn(python, args, { stdio: ['ignore', 'pipe', stderr], detached: true })
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
  for await (const line of createInterface({ input: child.stdout })) {
    stall()
    let m: { row?: BenchRow; failed?: { transport: string; blockBytes: number; error: string }; skipped?: { transport?: string; why: string } }
    try {
      m = JSON.parse(line)
    } catch {
      continue
    }
    if (m.row && validRow(m.row)) out.rows.push(m.row)
    else if (m.failed) out.failed.push({ transport: `${peer} ${m.failed.transport}`, blockBytes: m.failed.blockBytes, error: m.failed.error })
    else if (m.skipped) out.skipped.push({ transport: m.skipped.transport ? `${peer} ${m.skipped.transport}` : peer, why: m.skipped.why })
  }
  const code = await ended
  clearTimeout(timer)
  stderr.end()
  if (code !== 0 && code !== null) out.skipped.push({ transport: peer, why: `its driver ended with exit code ${code} (its log: ${log})` })
  return out
}

/** A driver's row, checked for the fields the table and the plot read. */
function validRow(r: BenchRow): boolean {
  const spread = (s: unknown) => typeof s === 'object' && s !== null && ['median', 'p10', 'p90'].every((k) => Number.isFinite((s as Record<string, number>)[k]))
  return typeof r.system === 'string' && typeof r.transport === 'string' && Number.isInteger(r.blockBytes) && spread(r.gbps) && spread(r.usPerCall) && typeof r.verified === 'boolean'
}
