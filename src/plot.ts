/**
 * The `--plot FILE` charts, drawn by Vega-Lite and rendered to SVG by Vega in Node: `kvtransfer bench`'s (GB/s,
 * median, against block size, one line per system and transport, the ceilings dashed) and `kvtransfer soak`'s
 * (each side's footprint over time). Both packages are optional peer dependencies of kvtransfer
 * (`npm install vega vega-lite`), loaded only when a plot is asked for.
 */
import type { BenchResult } from './bench.js'
import type { SoakResult } from './soak.js'

/** The Vega-Lite specification of a bench run's chart (data inline). */
export function benchSpec(r: BenchResult): object {
  const points = [
    ...r.rows.map((x) => ({ kib: x.blockBytes / 1024, gbps: x.gbps.median, series: `${x.system} ${x.transport}`, kind: 'measured' })),
    ...r.ceilings.map((c) => ({ kib: c.blockBytes / 1024, gbps: c.gbps.median, series: `ceiling: ${c.name}`, kind: 'ceiling' })),
  ]
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: {
      text: `kvtransfer bench: ${r.batch} scattered blocks per call, ${r.tensors === 2 ? 'keys and values' : 'keys only'}`,
      subtitle: `${r.machine.cpuModel}, ${r.machine.cpus} CPUs, ${r.date}`,
    },
    width: 640,
    height: 400,
    background: 'white',
    data: { values: points },
    mark: { type: 'line', point: true },
    encoding: {
      x: { field: 'kib', type: 'quantitative', title: 'block size (KiB)', scale: { type: 'log', base: 2 }, axis: { values: [...new Set(points.map((p) => p.kib))] } },
      // Logarithmic: the peers' 1 KiB rows are a fiftieth of ours.
      y: { field: 'gbps', type: 'quantitative', title: 'GB/s (median, log scale)', scale: { type: 'log' } },
      color: { field: 'series', type: 'nominal', title: null, legend: { labelLimit: 400 } },
      strokeDash: { field: 'kind', type: 'nominal', legend: null, scale: { domain: ['measured', 'ceiling'], range: [[1, 0], [6, 4]] } },
    },
  }
}

/** Loads Vega and Vega-Lite; throws, saying what to install, where either is absent. */
export async function loadVega(): Promise<{ vega: Vega; vegaLite: VegaLite }> {
  try {
    // Specifiers in variables: the compiler neither rewrites these imports into `require` (this module is
    // compiled as Node16 CommonJS, where `import()` stays a native import of an ES module) nor loads the
    // packages' own types (which need the DOM's).
    const [vegaName, vegaLiteName] = ['vega', 'vega-lite']
    const [vega, vegaLite] = await Promise.all([import(vegaName) as Promise<Vega>, import(vegaLiteName) as Promise<VegaLite>])
    return { vega, vegaLite }
  } catch (e) {
    throw new Error(`--plot draws with Vega-Lite: install it beside kvtransfer (npm install vega vega-lite): ${e instanceof Error ? e.message : String(e)}`)
  }
}

/**
 * The Vega-Lite specification of a soak's chart: one panel per measure (memory, threads, descriptors, data
 * connections, queue pairs, registered regions; those that stayed at 0 left out) over time, a line for the decode
 * process and one for the prefill processes together; `title` says what ran.
 */
export function soakSpec(r: SoakResult, title: string): object {
  const measures: Array<[string, (f: NonNullable<SoakResult['samples'][number]['prefill']>) => number | undefined]> = [
    ['memory (RSS, MiB)', (f) => f.rssBytes / 2 ** 20],
    ['threads', (f) => f.threads],
    ['descriptors', (f) => f.descriptors],
    ['TCP data connections', (f) => f.resources?.tcpDataConnections],
    ['shared-memory rings', (f) => f.resources?.shmRings],
    ['RDMA queue pairs', (f) => f.resources?.rdmaQueuePairs],
    ['RDMA registered regions', (f) => f.resources?.rdmaMemoryRegions],
  ]
  const all = r.samples.flatMap((s) =>
    (['decode', 'prefill'] as const).flatMap((side) => {
      const f = s[side]
      if (!f) return []
      return measures.flatMap(([measure, of]) => {
        const value = of(f)
        return value === undefined || Number.isNaN(value) ? [] : [{ seconds: s.elapsedMs / 1000, value, measure, side: side === 'decode' ? 'decodes' : 'prefills' }]
      })
    }),
  )
  // A measure that stayed at 0 throughout (queue pairs over TCP, say) is left out.
  const shown = new Set(all.filter((p) => p.value !== 0).map((p) => p.measure))
  const points = all.filter((p) => shown.has(p.measure))
  return {
    $schema: 'https://vega.github.io/schema/vega-lite/v6.json',
    title: { text: 'kvtransfer soak: footprint over time', subtitle: title },
    background: 'white',
    data: { values: points },
    facet: { row: { field: 'measure', type: 'nominal', title: null, sort: measures.map(([m]) => m) } },
    spec: {
      width: 560,
      height: 90,
      mark: { type: 'line', point: true },
      encoding: {
        x: { field: 'seconds', type: 'quantitative', title: 'seconds into the run' },
        y: { field: 'value', type: 'quantitative', title: null, scale: { zero: true }, axis: { format: ',d', tickMinStep: 1 } },
        color: { field: 'side', type: 'nominal', title: null },
      },
    },
    resolve: { scale: { y: 'independent' } },
  }
}

/** Renders a Vega-Lite specification to SVG text; throws, saying what to install, where Vega or Vega-Lite is absent. */
export async function svgOf(spec: object): Promise<string> {
  const { vega, vegaLite } = await loadVega()
  const compiled = vegaLite.compile(spec).spec
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' })
  try {
    return await view.toSVG()
  } finally {
    view.finalize()
  }
}

/** The little of Vega and Vega-Lite used here (their own types need the DOM's). */
export interface VegaLite {
  compile(spec: object): { spec: object }
}
export interface Vega {
  parse(spec: object): object
  View: new (runtime: object, options: { renderer: 'none' }) => { toSVG(): Promise<string>; finalize(): void }
}
