// Starts a decode peer process and talks to it.
import { fork } from 'node:child_process'
import { fileURLToPath } from 'node:url'

const script = fileURLToPath(new URL('./decode-peer.mjs', import.meta.url))

export async function startDecode(shape, { options, env, port } = {}) {
  const child = fork(script, [], { env: { ...process.env, ...env }, stdio: ['ignore', 'inherit', 'pipe', 'ipc'] })
  let stderr = ''
  child.stderr.on('data', (d) => (stderr += d))
  let next = 0
  const pending = new Map()
  child.on('message', ({ id, ok, error }) => {
    const p = pending.get(id)
    pending.delete(id)
    if (error) p.reject(Object.assign(new Error(error.message), { code: error.code }))
    else p.resolve(ok)
  })
  child.on('exit', (code) => {
    for (const p of pending.values()) p.reject(new Error(`decode peer exited with ${code}: ${stderr}`))
  })
  const call = (op, args) =>
    new Promise((resolve, reject) => {
      const id = next++
      pending.set(id, { resolve, reject })
      child.send({ id, op, args })
    })
  const started = await call('start', { shape, options, port })
  return {
    ...started,
    child,
    stderr: () => stderr,
    blockHashes: (tensor, layer, ids) => call('blockHashes', { tensor, layer, ids }),
    digest: () => call('digest'),
    close: () => call('close'),
    stop: () => {
      child.disconnect()
      return new Promise((r) => (child.exitCode !== null ? r() : child.on('exit', r)))
    },
  }
}
