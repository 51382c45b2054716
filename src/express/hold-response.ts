import type { ServerResponse } from 'node:http'

type Method = 'writeHead' | 'write' | 'end' | 'flushHeaders'
type AnyFunction = (...args: unknown[]) => unknown

/** Headers that describe a response body or a success; they must not leak into an error response. */
const SUCCESS_HEADERS = /^(content-|etag$|last-modified$|location$|set-cookie$|transfer-encoding$)/i

/**
 * Holds the response back until `commit` has settled, so the status line and headers (and a 2xx with them) go
 * out only after the session is stored. express-session flushes headers first and saves afterwards, which is how
 * a failed save still answers 200; this is the fix.
 *
 * Every path to the wire (writeHead, write, end, flushHeaders) is queued from its first call until the commit
 * settles, then replayed in order. When the body is streamed (headers flushed before end), `commit` runs again
 * at end for changes made while streaming; if that late commit fails the connection is destroyed, so the client
 * never sees a complete response for a change that was not stored.
 */
export function holdResponse(
  res: ServerResponse,
  commit: () => Promise<void>,
  onCommitError: (error: unknown) => void,
): void {
  const original: Record<Method, AnyFunction> = {
    writeHead: res.writeHead as AnyFunction,
    write: res.write as AnyFunction,
    end: res.end as AnyFunction,
    flushHeaders: res.flushHeaders as AnyFunction,
  }
  const target = res as unknown as Record<Method, AnyFunction>
  const queue: Array<{ method: Method; args: unknown[] }> = []
  let phase: 'open' | 'committing' | 'streaming' | 'done' = 'open'

  const restore = (methods: readonly Method[]): void => {
    for (const method of methods) target[method] = original[method]
  }

  const release = (): void => {
    const ended = queue.some((call) => call.method === 'end')
    phase = ended ? 'done' : 'streaming'
    restore(ended ? ['writeHead', 'write', 'end', 'flushHeaders'] : ['writeHead', 'write', 'flushHeaders'])
    for (const call of queue.splice(0)) original[call.method].apply(res, call.args)
  }

  const fail = (error: unknown): void => {
    phase = 'done'
    restore(['writeHead', 'write', 'end', 'flushHeaders'])
    queue.length = 0
    if (!res.headersSent) {
      for (const name of res.getHeaderNames()) if (SUCCESS_HEADERS.test(name)) res.removeHeader(name)
    }
    // A handler that was streaming may still write after the error response ended; that must not crash.
    res.on('error', () => {})
    onCommitError(error)
  }

  const intercept = (method: Method): AnyFunction =>
    function held(this: unknown, ...args: unknown[]): unknown {
      if (phase === 'streaming' && method === 'end') {
        phase = 'done'
        restore(['end'])
        commit().then(
          () => original.end.apply(res, args),
          (error: unknown) => res.destroy(error instanceof Error ? error : new Error(String(error))),
        )
        return res
      }
      queue.push({ method, args })
      if (phase === 'open') {
        phase = 'committing'
        commit().then(release, fail)
      }
      return method === 'write' ? true : method === 'flushHeaders' ? undefined : res
    }

  for (const method of ['writeHead', 'write', 'end', 'flushHeaders'] as const)
    target[method] = intercept(method)
}
