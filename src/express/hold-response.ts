import type { ServerResponse } from 'node:http'

type AnyFunction = (...args: unknown[]) => unknown
type WireMethod = 'writeHead' | 'write' | 'end' | 'flushHeaders'
type HeaderMethod = 'setHeader' | 'removeHeader' | 'appendHeader'

/** Runs after a successful commit, before anything is sent: where the session cookie is added. */
export type ApplyHeaders = () => void

/** Headers that describe a response body or a success; they must not leak into an error response. */
const SUCCESS_HEADERS = /^(content-|etag$|last-modified$|location$|set-cookie$|transfer-encoding$)/i
/** Bytes held before write() asks its producer to wait ('drain' follows once the commit is done). */
const HIGH_WATER_MARK = 16 * 1024

/**
 * Holds the response back until `commit` has settled, so the status line and headers (and a 2xx with them) go
 * out only after the session is stored. express-session flushes headers first and saves afterwards, which is how
 * a failed save still answers 200; this is the fix.
 *
 * From the first call that would put bytes on the wire (writeHead, write, end, flushHeaders) until the commit
 * settles, calls are queued and replayed in order; writeHead's status and headers are applied at once, so a bad
 * header throws in the handler as it would without this. Once end() is queued the response is frozen: later
 * writes and header changes are ignored (a second res.send or an error handler after a response must not
 * corrupt the one already given). When bytes were queued before end(), or the body is streamed, `commit` runs
 * again before end() for changes made meanwhile; if that late commit fails the connection is destroyed, so the
 * client never sees a complete response for a change that was not stored.
 */
export function holdResponse(
  res: ServerResponse,
  /** `final`: the response ends after this commit (no later commit will follow). */
  commit: (final: boolean) => Promise<ApplyHeaders | undefined>,
  onCommitError: (error: unknown) => void,
  /**
   * The commit done at once when it needs no I/O (a read): then end() goes straight out, with nothing queued.
   * Undefined when it cannot be; `commit` follows at once.
   */
  commitNow?: (final: boolean) => { applyHeaders: ApplyHeaders | undefined } | undefined,
): void {
  const target = res as unknown as Record<WireMethod | HeaderMethod, AnyFunction | undefined>
  const wire = {
    writeHead: res.writeHead as AnyFunction,
    write: res.write as AnyFunction,
    end: res.end as AnyFunction,
    flushHeaders: res.flushHeaders as AnyFunction,
  }
  const headers = {
    setHeader: res.setHeader as AnyFunction,
    removeHeader: res.removeHeader as AnyFunction,
    appendHeader: target.appendHeader as AnyFunction | undefined,
  }
  const queue: Array<{ method: WireMethod; args: unknown[] }> = []
  // 'sent': end() went straight out (nothing to store); like a frozen response, later calls are ignored.
  let phase: 'open' | 'committing' | 'streaming' | 'ending' | 'done' | 'sent' = 'open'
  let endQueued = false
  /** The status when end() was queued: a late next(err) may set 500 meanwhile; the response is the handler's. */
  let endStatus: { readonly code: number; readonly message: string } | undefined
  let queuedBytes = 0
  let producerWaiting = false

  const restoreWire = (): void => {
    for (const method of ['writeHead', 'write', 'end', 'flushHeaders'] as const) target[method] = wire[method]
  }
  const restoreHeaders = (): void => {
    for (const method of ['setHeader', 'removeHeader', 'appendHeader'] as const)
      target[method] = headers[method]
  }
  const destroy = (): void => {
    res.on('error', () => {})
    res.destroy()
  }
  const start = (final: boolean): void => {
    if (phase !== 'open') return
    phase = 'committing'
    commit(final).then(release, fail)
  }

  const release = (applyHeaders: ApplyHeaders | undefined): void => {
    restoreHeaders()
    try {
      applyHeaders?.()
    } catch (error) {
      fail(error)
      return
    }
    const endAt = queue.findIndex((call) => call.method === 'end')
    const lateEnd = endAt > 0 ? queue[endAt] : undefined
    const calls = queue.splice(0, lateEnd ? endAt : queue.length)
    queue.length = 0
    if (endStatus) {
      res.statusCode = endStatus.code
      res.statusMessage = endStatus.message
    }
    phase = endAt === 0 ? 'done' : 'streaming'
    target.writeHead = wire.writeHead
    target.write = wire.write
    target.flushHeaders = wire.flushHeaders
    if (phase === 'done') target.end = wire.end
    let writable = true
    try {
      for (const call of calls) {
        const result =
          call.method === 'writeHead'
            ? wire.writeHead.call(res, res.statusCode)
            : wire[call.method].apply(res, call.args)
        if (call.method === 'write') writable = result !== false
      }
    } catch {
      destroy()
      return
    }
    if (producerWaiting && writable) res.emit('drain')
    if (lateEnd) finishAfterCommit(lateEnd.args)
  }

  const fail = (error: unknown): void => {
    phase = 'done'
    restoreWire()
    restoreHeaders()
    const callbacks = queue.flatMap((call) =>
      call.args.filter((arg): arg is AnyFunction => typeof arg === 'function'),
    )
    queue.length = 0
    if (!res.headersSent) {
      for (const name of res.getHeaderNames()) if (SUCCESS_HEADERS.test(name)) res.removeHeader(name)
      res.statusCode = 500
    }
    // A handler that was streaming may still write after the error response ended; that must not crash.
    res.on('error', () => {})
    for (const callback of callbacks) process.nextTick(callback, error)
    onCommitError(error)
  }

  /** end() after bytes went out: store changes made meanwhile, then end, or cut the connection. */
  const finishAfterCommit = (args: unknown[]): void => {
    phase = 'ending'
    commit(true).then(
      () => {
        phase = 'done'
        target.end = wire.end
        try {
          wire.end.apply(res, args)
        } catch {
          destroy()
        }
      },
      () => {
        phase = 'done'
        target.end = wire.end
        destroy()
      },
    )
  }

  const ignoredWhileFrozen = (method: HeaderMethod): AnyFunction =>
    function frozen(this: unknown, ...args: unknown[]): unknown {
      if (phase === 'open' || phase === 'committing' || phase === 'sent') {
        return method === 'removeHeader' ? undefined : res
      }
      return headers[method]?.apply(res, args)
    }

  const freezeHeaders = (): void => {
    target.setHeader = ignoredWhileFrozen('setHeader')
    target.removeHeader = ignoredWhileFrozen('removeHeader')
    if (headers.appendHeader) target.appendHeader = ignoredWhileFrozen('appendHeader')
  }

  // Other middleware (compression, on-headers) may capture these functions; once released they pass through.
  target.writeHead = function writeHead(...args: unknown[]): unknown {
    if (phase === 'sent') return res
    if (phase !== 'open' && phase !== 'committing') return wire.writeHead.apply(res, args)
    if (endQueued) return res
    applyWriteHead(res, headers, args)
    // Status and headers are already applied; one marker is enough to send them at the right point.
    if (!queue.some((call) => call.method === 'writeHead')) queue.push({ method: 'writeHead', args: [] })
    start(false)
    return res
  }
  target.write = function write(...args: unknown[]): unknown {
    if (phase === 'sent') return false
    if (phase !== 'open' && phase !== 'committing') return wire.write.apply(res, args)
    if (endQueued) return false
    queuedBytes += chunkLength(args[0], true)
    queue.push({ method: 'write', args })
    start(false)
    if (queuedBytes < HIGH_WATER_MARK) return true
    producerWaiting = true
    return false
  }
  target.end = function end(...args: unknown[]): unknown {
    if (phase === 'sent') return res
    if (phase === 'streaming') {
      if (typeof args[0] !== 'function') chunkLength(args[0], false)
      finishAfterCommit(args)
      return res
    }
    if (phase !== 'open' && phase !== 'committing')
      return phase === 'ending' ? res : wire.end.apply(res, args)
    if (endQueued) return res
    if (typeof args[0] !== 'function') chunkLength(args[0], false)
    if (phase === 'open' && queue.length === 0) {
      const done = commitNow?.(true)
      if (done) {
        try {
          done.applyHeaders?.()
        } catch (error) {
          fail(error)
          return res
        }
        // The wrappers pass through while Node ends the response (it calls writeHead itself), then it is frozen,
        // as a held response is: a second send or a late error handler changes nothing.
        phase = 'done'
        const result = wire.end.apply(res, args)
        phase = 'sent'
        freezeHeaders()
        return result
      }
    }
    endQueued = true
    endStatus = { code: res.statusCode, message: res.statusMessage }
    freezeHeaders()
    queue.push({ method: 'end', args })
    start(true)
    return res
  }
  target.flushHeaders = function flushHeaders(...args: unknown[]): unknown {
    if (phase === 'sent') return undefined
    if (phase !== 'open' && phase !== 'committing') return wire.flushHeaders.apply(res, args)
    if (endQueued) return undefined
    queue.push({ method: 'flushHeaders', args })
    start(false)
    return undefined
  }
}

/** writeHead(status, [reason], [headers]) applied now, as Node would: invalid input throws in the handler. */
function applyWriteHead(
  res: ServerResponse,
  headers: { setHeader: AnyFunction; appendHeader: AnyFunction | undefined },
  args: unknown[],
): void {
  const [statusCode, second, third] = args
  if (
    typeof statusCode !== 'number' ||
    !Number.isInteger(statusCode) ||
    statusCode < 100 ||
    statusCode > 999
  ) {
    throw Object.assign(new RangeError(`Invalid status code: ${String(statusCode)}`), {
      code: 'ERR_HTTP_INVALID_STATUS_CODE',
    })
  }
  const fields = typeof second === 'string' ? third : second
  res.statusCode = statusCode
  if (typeof second === 'string') res.statusMessage = second
  if (Array.isArray(fields)) {
    // The raw form: [name, value, name, value, ...]; repeated names are kept, as Node does.
    for (let i = 0; i + 1 < fields.length; i += 2) {
      ;(headers.appendHeader ?? headers.setHeader).call(res, fields[i], fields[i + 1])
    }
  } else if (fields && typeof fields === 'object') {
    for (const [name, value] of Object.entries(fields)) if (name) headers.setHeader.call(res, name, value)
  }
}

/** Byte length of a body chunk; throws, as Node does, for anything that is not a string or bytes. */
function chunkLength(chunk: unknown, required: boolean): number {
  if (typeof chunk === 'string') return Buffer.byteLength(chunk)
  if (chunk instanceof Uint8Array) return chunk.byteLength
  if (!required && chunk == null) return 0
  throw Object.assign(
    new TypeError(
      `The "chunk" argument must be of type string or an instance of Buffer or Uint8Array. Received ${typeof chunk}`,
    ),
    { code: 'ERR_INVALID_ARG_TYPE' },
  )
}
