import { setImmediate } from 'node:timers'
import { OperationTimeoutError } from '../errors.js'

/**
 * Settles with `operation`, or rejects with OperationTimeoutError after `timeoutMs`. `onTimeout` lets the caller
 * reset a client whose request may never be answered; `mapError` turns
 * the operation's own failure into the error to reject with. One promise per operation: this is the hot path.
 */
export function withTimeout<T>(
  operation: Promise<T>,
  timeoutMs: number,
  describe: () => string,
  onTimeout?: () => void,
  mapError: (error: unknown) => unknown = (error) => error,
): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    let settled = false
    const timer = setTimeout(() => {
      // Timers run before the loop reads its sockets: after a stall of this process's own loop (a long
      // synchronous handler, garbage collection) an answer that came in time may be waiting unread. Decided once
      // the loop has read them, in the check phase of the same pass.
      setImmediate(() => {
        if (settled) return
        settled = true
        reject(new OperationTimeoutError(`${describe()} did not answer within ${timeoutMs} ms`))
        onTimeout?.()
      })
    }, timeoutMs)
    operation.then(
      (value) => {
        settled = true
        clearTimeout(timer)
        resolve(value)
      },
      (error: unknown) => {
        settled = true
        clearTimeout(timer)
        reject(mapError(error))
      },
    )
  })
}
