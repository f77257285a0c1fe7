// Serving kvtransfer's metrics to Prometheus: a decode and a prefill communicator (here in one process) add their
// counts to prom-client's registry with `kvtransfer/prometheus`, and `node:http` serves it on `/metrics`, beside
// whatever else the engine exports. Point Prometheus at it, and Grafana at Prometheus with
// `examples/grafana-dashboard.json`.
//
//   node examples/dist/metrics-server.js               (once built: `tsc -p examples`; needs `npm install prom-client`)
//   METRICS_SECONDS=600 METRICS_PORT=9464 node examples/dist/metrics-server.js   (serves for ten minutes)
//
// It writes requests of every layer for METRICS_SECONDS (default 2), scrapes itself once, prints the kvtransfer
// lines it got and the prefill's write latency read from stats(), and exits.
import { createServer } from 'node:http'
import { setTimeout as sleep } from 'node:timers/promises'
import { collectDefaultMetrics, register as registry } from 'prom-client'
import { Communicator, HostBuffer, quantile } from 'kvtransfer'
import { register } from 'kvtransfer/prometheus'

const LAYERS = 4
const BLOCKS = 256
const BLOCK_BYTES = 16 << 10
const HOST = '127.0.0.1'
const SECONDS = Number(process.env.METRICS_SECONDS ?? 2)
const PORT = Number(process.env.METRICS_PORT ?? 0)

function cache() {
  const layer = () => HostBuffer.alloc(BLOCKS * BLOCK_BYTES)
  return { keys: Array.from({ length: LAYERS }, layer), values: Array.from({ length: LAYERS }, layer), blockNumber: BLOCKS, blockBytes: BLOCK_BYTES }
}

async function main(): Promise<void> {
  const decode = await Communicator.decodeAsync({ ...cache(), socketIfname: 'lo' })
  const prefill = await Communicator.prefillAsync(cache())
  // The process's own metrics and kvtransfer's, in one registry.
  collectDefaultMetrics({ register: registry })
  register(decode, { registry, labels: { engine: 'decode-0' } })
  register(prefill, { registry, labels: { engine: 'prefill-0' } })

  const server = createServer(async (req, res) => {
    if (req.url !== '/metrics') return void res.writeHead(404).end()
    res.writeHead(200, { 'content-type': registry.contentType }).end(await registry.metrics())
  })
  await new Promise<void>((resolve) => server.listen(PORT, HOST, resolve))
  const address = server.address()
  const port = typeof address === 'object' && address ? address.port : PORT
  console.log(`serving http://${HOST}:${port}/metrics for ${SECONDS} s`)

  // Traffic: a request of 64 scattered blocks, layer by layer, one after another.
  const peer = await prefill.connect(HOST, decode.port)
  const until = Date.now() + SECONDS * 1000
  for (let r = 0; Date.now() < until; r++) {
    const local = Array.from({ length: 64 }, (_, i) => (r * 7 + i * 3) % BLOCKS)
    const remote = Array.from({ length: 64 }, (_, i) => (r * 5 + i) % BLOCKS)
    for (let layer = 0; layer < LAYERS; layer++) await peer.write(local, remote, layer, { requestId: `req-${r}` })
    await decode.waitFor(`req-${r}`, { timeoutMs: 5000 })
    if (r % 64 === 63) await sleep(1)
  }

  const scraped = await (await fetch(`http://${HOST}:${port}/metrics`)).text()
  const ours = scraped.split('\n').filter((l) => /^kvtransfer_(writes|bytes|requests_ended)_total/.test(l))
  console.log(ours.join('\n'))
  const stats = peer.stats()
  const p99 = quantile(stats.writeSeconds, 0.99)
  console.log(`prefill: ${stats.writes} writes, ${(stats.bytes / 2 ** 20).toFixed(1)} MiB, p99 write ≤ ${p99 === null ? '-' : (p99 * 1e6).toFixed(0)} µs`)
  if (!ours.some((l) => l.startsWith('kvtransfer_bytes_total{') && !l.endsWith(' 0'))) throw new Error('no bytes were counted')

  server.close()
  await prefill.close()
  await decode.close()
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
