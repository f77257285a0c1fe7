// Each role's communicator has only its own methods: every call below on the wrong role must fail to compile
// (`tsc -p __test__/types` fails if an @ts-expect-error line compiles). Type-checked only, never run.
import { Communicator } from 'kvtransfer'

export async function wrongRoles(): Promise<void> {
  const cache = { keyPtrs: [0n], blockNumber: 1, blockBytes: 1 }
  const prefill = Communicator.prefill(cache)
  const decode = Communicator.decode(cache)
  // @ts-expect-error notifications are a decode's
  prefill.notifications()
  // @ts-expect-error waitFor is a decode's
  await prefill.waitFor('r')
  // @ts-expect-error revoke is a decode's
  await prefill.revoke('r')
  // @ts-expect-error a prefill listens on no port
  prefill.port.toFixed()
  // @ts-expect-error connect is a prefill's
  await decode.connect('127.0.0.1', 1)
  // @ts-expect-error a decode has no peers to write to
  decode.peer('127.0.0.1', 1)
  // @ts-expect-error abortRequest is a prefill's
  await decode.abortRequest('127.0.0.1', 1, 'r')
  // And the right roles compile.
  const peer = await prefill.connect('127.0.0.1', decode.port)
  await peer.write([0], [0], 0, { requestId: 'r' })
  for await (const n of decode.notifications()) n.status satisfies 'done' | 'failed' | 'aborted' | 'expired'
  await decode.waitFor('r')
  await Promise.all([prefill.close(), decode.close()])
}
