#!/usr/bin/env node
/**
 * `npx kvtransfer info [--json]`: what this machine offers kvtransfer. Exits 1 when a `KVCACHE_*` variable
 * holds a value a communicator would refuse.
 *
 * @packageDocumentation
 */
import { systemInfo, type SystemInfo } from './index.js'

const usage = 'usage: kvtransfer info [--json]'

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

function main(args: string[]): number {
  const [command, ...flags] = args
  if (command !== 'info' || flags.some((f) => f !== '--json')) {
    console.error(usage)
    return 2
  }
  const info = systemInfo()
  if (flags.includes('--json')) console.log(JSON.stringify(info, null, 2))
  else print(info)
  return info.settings.some((s) => s.error) ? 1 : 0
}

process.exitCode = main(process.argv.slice(2))
