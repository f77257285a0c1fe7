/**
 * Loads the native addon through napi-rs's generated loader (`binding.js`), which picks the binary of this
 * platform (beside the package in a source build, else its per-platform package). Where none fits, the error
 * names the platform and the package it needs.
 */
import type * as Native from '../binding.js'

import { platform, SHIPPED_PLATFORMS } from './platform.js'

export { platform }

/** The native addon of this platform. */
export const native: typeof Native = load()

function load(): typeof Native {
  try {
    return require('../binding.js')
  } catch (err) {
    const target = platform()
    const why = SHIPPED_PLATFORMS.includes(target)
      ? `its package kvtransfer-${target} is not installed or cannot load (reinstall kvtransfer with optional dependencies enabled)`
      : `kvtransfer ships binaries for ${SHIPPED_PLATFORMS.join(' and ')} only (build it from source with \`npm run build\`)`
    throw new Error(`kvtransfer: no native binary for this platform, ${target}: ${why}`, { cause: err })
  }
}

/** The path of the native binary this process loaded: beside the package (a source build) or its package. */
export function nativeBinary(): string | null {
  const target = platform()
  for (const id of [`../kvtransfer.${target}.node`, `kvtransfer-${target}`]) {
    try {
      return require.resolve(id)
    } catch {
      // not this one
    }
  }
  return null
}
