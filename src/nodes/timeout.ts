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
    const timer = setTimeout(() => {
      reject(new OperationTimeoutError(`${describe()} did not answer within ${timeoutMs} ms`))
      onTimeout?.()
    }, timeoutMs)
    operation.then(
      (value) => {
        clearTimeout(timer)
        resolve(value)
      },
      (error: unknown) => {
        clearTimeout(timer)
        reject(mapError(error))
      },
    )
  })
}
