// A process whose communicators route their logs with onLog (one hook throws): it makes a decode with a token,
// a prefill without it (refused: an error line), a prefill with it and debug on (debug lines), and a seed-API
// decode listening beyond loopback without a token where this machine has such an interface (a warning). It
// prints the records it got as one JSON line on stdout; the test reads its standard error too.
import { Communicator, HostBuffer, RDMACommunicator } from 'kvtransfer'

const records = []
const onLog = (r) => records.push(r)
const token = 'a-token-of-at-least-32-characters-00000000'
const cache = () => ({ keys: [HostBuffer.alloc(4096)], values: [HostBuffer.alloc(4096)], blockNumber: 4, blockBytes: 1024, transport: 'tcp' })

const decode = Communicator.decode({ ...cache(), socketIfname: 'lo', authToken: token, onLog })
const stranger = Communicator.prefill({ ...cache(), reconnect: { retries: 0 }, onLog })
const refused = await stranger.connect('127.0.0.1', decode.port).then(() => 'admitted', (e) => e.code)
const prefill = Communicator.prefill({ ...cache(), authToken: token, debug: true, onLog })
const peer = await prefill.connect('127.0.0.1', decode.port)
await peer.write([0], [1], 0)
const warnings = []
process.on('warning', (w) => warnings.push(w.message))
const thrower = Communicator.prefill({ ...cache(), debug: true, reconnect: { retries: 0 }, onLog: () => { throw new Error('the hook broke') } })
await thrower.connect('127.0.0.1', 1).catch(() => {})
// Beyond loopback without a token: the seed API listens, with a warning.
const open = new RDMACommunicator('decode', 0, 0, [HostBuffer.alloc(4096).ptr], [], 4, 1024, 1, 0, { transport: 'tcp', onLog })
open.close()
for (const c of [thrower, prefill, stranger, decode]) await c.close()
await new Promise((r) => setTimeout(r, 100))
process.stdout.write(JSON.stringify({ refused, records, warnings }) + '\n')
