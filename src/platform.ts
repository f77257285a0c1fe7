/**
 * Which platform this is, as the per-platform packages name it: what the loader and `kvtransfer info` say, with
 * or without a native binary.
 */

/** The platforms kvtransfer ships a native binary for. */
export const SHIPPED_PLATFORMS = ['linux-x64-gnu', 'linux-arm64-gnu']

/** This machine's platform as the per-platform packages name it: `linux-x64-gnu`, `linux-arm64-musl`, ... */
export function platform(): string {
  const base = `${process.platform}-${process.arch}`
  if (process.platform !== 'linux') return base
  const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined
  return `${base}-${report?.header?.glibcVersionRuntime ? 'gnu' : 'musl'}`
}
