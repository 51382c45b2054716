import type { ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import { answerAtEndOfTurn } from '../end-of-turn.js'
import { type Logger, silentLogger } from '../logger.js'

type AnyFunction = (...args: unknown[]) => unknown
type WireMethod = 'writeHead' | 'write' | 'end' | 'flushHeaders'
type HeaderMethod = 'setHeader' | 'removeHeader' | 'appendHeader'

/** Runs after a successful commit, before anything is sent: where the session cookie is added. */
export type ApplyHeaders = () => void

/** Headers that describe a response body or a success; they must not leak into an error response. */
const SUCCESS_HEADERS = /^(content-|etag$|last-modified$|location$|set-cookie$|transfer-encoding$)/i
/**
 * Put on a held response once its handler began sending (writeHead, write, flushHeaders): from then on the
 * response counts as started, as it would without the hold. An error handler reached after the first write
 * (Express's own, or one that checks `res.headersSent`, as Express's guide advises) then cuts the connection
 * instead of writing an error response after the queued bytes, which would corrupt the connection.
 */
const STARTED: PropertyDescriptor = { configurable: true, enumerable: false, get: () => true }

/** Bytes held before write() asks its producer to wait ('drain' follows once the commit is done). */
const HIGH_WATER_MARK = 16 * 1024

/**
 * Each held response's hold, where the shared wrappers below find it. Not a property of the response: a response
 * in fast mode (one this module is used on without the middleware's toDictionaryMode) copies its whole map for
 * each property added to it once Express has set its prototype.
 */
const holds = new WeakMap<ServerResponse, ResponseHold>()

/** The response's own header functions, kept while header changes are frozen. */
interface HeaderFunctions {
  readonly setHeader: AnyFunction
  readonly removeHeader: AnyFunction
  readonly appendHeader: AnyFunction | undefined
}

type Phase = 'open' | 'committing' | 'streaming' | 'ending' | 'done' | 'sent'

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
 *
 * The wrappers put on the response are the same functions for every response, and stay in place once released
 * (they pass calls through), so as few properties as possible are stored on a response (see toDictionaryMode).
 */
export function holdResponse(
  res: ServerResponse,
  /** `final`: the response ends after this commit (no later commit will follow). */
  commit: (final: boolean) => Promise<ApplyHeaders | undefined>,
  onCommitError: (error: unknown) => void,
  /**
   * The commit done at once when it needs no I/O (a read): then end() waits only for the end of the turn, not
   * for a promise. Undefined when it cannot be; `commit` follows at once.
   */
  commitNow?: (final: boolean) => { applyHeaders: ApplyHeaders | undefined } | undefined,
  /** Told when a held call throws once replayed (the connection is then cut, with no other trace). */
  logger: Logger = silentLogger,
): void {
  // Held twice (the middleware ran again for a request whose session was set to null): the inner hold releases
  // into the outer one, as nested wrappers would.
  const outer = holds.get(res)
  holds.set(res, new ResponseHold(res, commit, onCommitError, commitNow, logger, outer))
  res.writeHead = heldWriteHead as ServerResponse['writeHead']
  res.write = heldWrite as ServerResponse['write']
  res.end = heldEnd as ServerResponse['end']
  res.flushHeaders = heldFlushHeaders
}

// Other middleware (compression, on-headers) may capture these functions; once released they pass through.
function heldWriteHead(this: ServerResponse, ...args: unknown[]): unknown {
  return (holds.get(this) as ResponseHold).writeHead(args)
}
function heldWrite(this: ServerResponse, ...args: unknown[]): unknown {
  return (holds.get(this) as ResponseHold).write(args)
}
function heldEnd(this: ServerResponse, ...args: unknown[]): unknown {
  return (holds.get(this) as ResponseHold).end(args)
}
function heldFlushHeaders(this: ServerResponse): void {
  ;(holds.get(this) as ResponseHold).flushHeaders()
}
function frozenSetHeader(this: ServerResponse, ...args: unknown[]): unknown {
  return (holds.get(this) as ResponseHold).header('setHeader', args)
}
function frozenRemoveHeader(this: ServerResponse, ...args: unknown[]): unknown {
  return (holds.get(this) as ResponseHold).header('removeHeader', args)
}
function frozenAppendHeader(this: ServerResponse, ...args: unknown[]): unknown {
  return (holds.get(this) as ResponseHold).header('appendHeader', args)
}

class ResponseHold {
  readonly #res: ServerResponse
  readonly #commit: (final: boolean) => Promise<ApplyHeaders | undefined>
  readonly #onCommitError: (error: unknown) => void
  readonly #commitNow:
    | ((final: boolean) => { applyHeaders: ApplyHeaders | undefined } | undefined)
    | undefined
  readonly #logger: Logger
  readonly #wire: Record<WireMethod, AnyFunction>
  /** Read when end() freezes the headers; set back when the response is released. */
  #headers: HeaderFunctions | undefined
  readonly #queue: Array<{ method: WireMethod; args: unknown[] }> = []
  // 'sent': ended with nothing to store; like a frozen response, later calls are ignored.
  #phase: Phase = 'open'
  #endQueued = false
  /** The status when end() was queued: a late next(err) may set 500 meanwhile; the response is the handler's. */
  #endStatus: { readonly code: number; readonly message: string } | undefined
  #queuedBytes = 0
  #producerWaiting = false
  /**
   * Set when a write or end came while the response's write or end was another middleware's wrapper (compression
   * mounted after this one): that middleware has taken the handler's calls and may keep state of its own (ended,
   * its stream still flushing), so the response cannot be handed to an error handler if the commit fails. A
   * wrapper that puts the response's own function back before calling it (express-winston) is not seen.
   */
  #takenAbove = false

  constructor(
    res: ServerResponse,
    commit: (final: boolean) => Promise<ApplyHeaders | undefined>,
    onCommitError: (error: unknown) => void,
    commitNow: ((final: boolean) => { applyHeaders: ApplyHeaders | undefined } | undefined) | undefined,
    logger: Logger,
    outer: ResponseHold | undefined,
  ) {
    this.#res = res
    this.#commit = commit
    this.#onCommitError = onCommitError
    this.#commitNow = commitNow
    this.#logger = logger
    this.#wire = outer
      ? {
          writeHead: (...args) => outer.writeHead(args),
          write: (...args) => outer.write(args),
          end: (...args) => outer.end(args),
          flushHeaders: () => outer.flushHeaders(),
        }
      : {
          writeHead: res.writeHead as AnyFunction,
          write: res.write as AnyFunction,
          end: res.end as AnyFunction,
          flushHeaders: res.flushHeaders as AnyFunction,
        }
  }

  /** Before the release, nothing goes out; afterwards the wrappers pass every call through. */
  get #holding(): boolean {
    return this.#phase === 'open' || this.#phase === 'committing'
  }

  writeHead(args: unknown[]): unknown {
    const res = this.#res
    if (this.#phase === 'sent' || this.#phase === 'ending') return res
    if (!this.#holding) return this.#wire.writeHead.apply(res, args)
    if (this.#endQueued) return res
    applyWriteHead(res, args)
    // Status and headers are already applied; one marker is enough to send them at the right point.
    if (!this.#queue.some((call) => call.method === 'writeHead'))
      this.#queue.push({ method: 'writeHead', args: [] })
    this.#started()
    this.#start(false)
    return res
  }

  write(args: unknown[]): unknown {
    // Once end() was called, a write is ignored (while that end waits for its commit, it would go out first).
    if (this.#phase === 'sent' || this.#phase === 'ending') return false
    if (!this.#holding) return this.#wire.write.apply(this.#res, args)
    if (this.#endQueued) return false
    // A write that came through another middleware's write (compression's deflated bytes).
    if (this.#res.write !== heldWrite) this.#takenAbove = true
    this.#queuedBytes += chunkLength(args[0], true)
    this.#queue.push({ method: 'write', args })
    this.#started()
    this.#start(false)
    if (this.#queuedBytes < HIGH_WATER_MARK) return true
    this.#producerWaiting = true
    return false
  }

  end(args: unknown[]): unknown {
    const res = this.#res
    const phase = this.#phase
    if (phase === 'sent' || phase === 'ending') return res
    if (phase === 'streaming') {
      if (typeof args[0] !== 'function') chunkLength(args[0], false)
      this.#finishAfterCommit(args)
      return res
    }
    if (phase === 'done') return this.#wire.end.apply(res, args)
    if (this.#endQueued) return res
    if (typeof args[0] !== 'function') chunkLength(args[0], false)
    // An end that came through another middleware's end still in place (compression's, once it has flushed).
    if (res.end !== heldEnd) this.#takenAbove = true
    this.#endQueued = true
    this.#endStatus = { code: res.statusCode, message: res.statusMessage }
    this.#freezeHeaders()
    this.#queue.push({ method: 'end', args })
    const done = phase === 'open' && this.#queue.length === 1 ? this.#commitNow?.(true) : undefined
    if (!done) {
      this.#start(true)
      return res
    }
    // Nothing to store: the response leaves at the end of this turn, after the node requests the turn made
    // (end-of-turn.ts says why). Until then it is held, as a response waiting for its commit is.
    this.#phase = 'committing'
    answerAtEndOfTurn(() => {
      // Not ended yet when released into an outer hold (the middleware ran twice), which freezes it once it ends;
      // until then this hold passes the outer's calls through.
      if (!this.#release(done.applyHeaders) || !this.#res.writableEnded) return
      // Then frozen, as before its release: a second send or a late error handler changes nothing.
      this.#phase = 'sent'
      this.#freezeHeaders()
    })
    return res
  }

  flushHeaders(): void {
    if (this.#phase === 'sent' || this.#phase === 'ending') return
    if (!this.#holding) {
      this.#wire.flushHeaders.call(this.#res)
      return
    }
    if (this.#endQueued) return
    this.#queue.push({ method: 'flushHeaders', args: [] })
    this.#started()
    this.#start(false)
  }

  /** A header change once end() is queued: ignored until the response is released, then passed through. */
  header(method: HeaderMethod, args: unknown[]): unknown {
    if (this.#holding || this.#phase === 'sent') return method === 'removeHeader' ? undefined : this.#res
    return (this.#headers as HeaderFunctions)[method]?.apply(this.#res, args)
  }

  #freezeHeaders(): void {
    const res = this.#res as unknown as Record<HeaderMethod, AnyFunction | undefined>
    this.#headers = {
      setHeader: res.setHeader as AnyFunction,
      removeHeader: res.removeHeader as AnyFunction,
      appendHeader: res.appendHeader,
    }
    res.setHeader = frozenSetHeader
    res.removeHeader = frozenRemoveHeader
    if (this.#headers.appendHeader) res.appendHeader = frozenAppendHeader
  }

  #restoreHeaders(): void {
    const headers = this.#headers
    if (!headers) return
    const res = this.#res as unknown as Record<HeaderMethod, AnyFunction | undefined>
    res.setHeader = headers.setHeader
    res.removeHeader = headers.removeHeader
    if (headers.appendHeader) res.appendHeader = headers.appendHeader
  }

  #started(): void {
    if (!Object.hasOwn(this.#res, 'headersSent')) Object.defineProperty(this.#res, 'headersSent', STARTED)
  }

  /** Back to the response's own headersSent: on release, or when the commit failed before anything went out. */
  #unstarted(): void {
    delete (this.#res as { headersSent?: boolean }).headersSent
  }

  #destroy(): void {
    this.#res.on('error', () => {})
    this.#res.destroy()
  }

  /**
   * A held call threw when replayed after the commit (e.g. the write of a compression middleware mounted before
   * this one): the handler that made it has returned, so nobody can catch it, and part of the response may be out.
   * Cut the connection, and say why: otherwise the client's reset is the only trace. Later calls go nowhere, as on
   * the destroyed socket, so a response logs this once. Cut first: a logger that throws (or an error that cannot
   * be made a string) must neither leave the connection open nor escape into the commit's promise.
   */
  #replayFailed(method: WireMethod, error: unknown): void {
    this.#phase = 'sent'
    this.#destroy()
    try {
      this.#logger.error(
        { err: String(error), call: method },
        'session-failover: a held response call threw when sent after the session was stored; connection cut',
      )
    } catch {
      // Nothing is left to tell: the connection is already cut.
    }
  }

  #start(final: boolean): void {
    if (this.#phase !== 'open') return
    this.#phase = 'committing'
    this.#commit(final).then(
      (applyHeaders) => this.#release(applyHeaders),
      (error: unknown) => this.#fail(error),
    )
  }

  /** Sends what was held; false when it could not (the commit's headers failed, and the error was answered). */
  #release(applyHeaders: ApplyHeaders | undefined): boolean {
    const res = this.#res
    this.#unstarted()
    this.#restoreHeaders()
    if (res.destroyed) {
      // Cut meanwhile (an error handler after the first write, or the client left): nothing to send.
      this.#phase = 'done'
      this.#queue.length = 0
      return false
    }
    try {
      applyHeaders?.()
    } catch (error) {
      this.#fail(error)
      return false
    }
    const queue = this.#queue
    const endAt = queue.findIndex((call) => call.method === 'end')
    const lateEnd = endAt > 0 ? queue[endAt] : undefined
    const calls = queue.splice(0, lateEnd ? endAt : queue.length)
    queue.length = 0
    if (this.#endStatus) {
      res.statusCode = this.#endStatus.code
      res.statusMessage = this.#endStatus.message
    }
    this.#phase = endAt === 0 ? 'done' : 'streaming'
    let writable = true
    for (const call of calls) {
      try {
        const result =
          call.method === 'writeHead'
            ? this.#wire.writeHead.call(res, res.statusCode)
            : this.#wire[call.method].apply(res, call.args)
        if (call.method === 'write') writable = result !== false
      } catch (error) {
        this.#replayFailed(call.method, error)
        return false
      }
    }
    if (this.#producerWaiting && writable) res.emit('drain')
    if (lateEnd) this.#finishAfterCommit(lateEnd.args)
    return true
  }

  #fail(error: unknown): void {
    const res = this.#res
    const callbacks = this.#queue.flatMap((call) =>
      call.args.filter((arg): arg is AnyFunction => typeof arg === 'function'),
    )
    this.#queue.length = 0
    for (const callback of callbacks) process.nextTick(callback, error)
    // The error handler can answer only a response nothing is producing any more: the handler ended it, and no
    // middleware above this one took its calls. A handler still writing would write into the error response
    // (or, once its bytes sent the headers, make the error handler throw), and a compression middleware that
    // has ended swallows the error response, then sends its own bytes under the error status. Then the
    // connection is cut, as for a streamed response whose last store failed, and later calls go nowhere; the
    // error still goes to the error handler, for its log.
    if (!this.#endQueued || this.#takenAbove) {
      this.#phase = 'sent'
      this.#destroy()
      this.#onCommitError(error)
      return
    }
    this.#phase = 'done'
    this.#unstarted()
    this.#restoreHeaders()
    if (!res.headersSent) {
      for (const name of res.getHeaderNames()) if (SUCCESS_HEADERS.test(name)) res.removeHeader(name)
      res.statusCode = 500
    }
    // A late call after the error response ended must not crash.
    res.on('error', () => {})
    this.#onCommitError(error)
  }

  /**
   * end() after bytes went out: store changes made meanwhile, then end, or cut the connection. With nothing
   * changed, it ends at once: an error handler reached right after end() (a late next(err)) then finds the
   * response complete, instead of cutting it short while a commit with nothing to store runs.
   */
  #finishAfterCommit(args: unknown[]): void {
    if (this.#commitNow?.(true)) {
      this.#phase = 'done'
      try {
        this.#wire.end.apply(this.#res, args)
      } catch (error) {
        this.#replayFailed('end', error)
      }
      return
    }
    this.#phase = 'ending'
    const destroyLater = deferDestroy(this.#res)
    this.#commit(true).then(
      () => {
        this.#phase = 'done'
        try {
          this.#wire.end.apply(this.#res, args)
        } catch (error) {
          this.#replayFailed('end', error)
        }
        destroyLater()
      },
      () => {
        this.#phase = 'done'
        destroyLater()
        this.#destroy()
      },
    )
  }
}

/**
 * Puts off the destroy of the response's connection until the returned function is called, then does it if it
 * was asked for. While the end() of a streamed response waits for its last store, an error handler reached
 * through a late next(err) finds the headers sent and destroys the connection (Express's own does
 * `req.socket.destroy()`): without the hold, end() had already written the last bytes, so the client got them
 * all. Shadowed on the socket itself, for the few milliseconds of that store only.
 */
function deferDestroy(res: ServerResponse): () => void {
  const socket = res.socket as (Socket & { destroy: Socket['destroy'] }) | null
  // One deferral per socket at a time: a response held twice (the middleware ran again) defers once, so the
  // socket's own destroy is always the one put back.
  if (!socket || socket.destroyed || deferring.has(socket)) return () => {}
  deferring.add(socket)
  const own = Object.getOwnPropertyDescriptor(socket, 'destroy')
  let asked = false
  const putOff = function putOff(this: Socket) {
    asked = true
    return this
  }
  socket.destroy = putOff
  return () => {
    deferring.delete(socket)
    if (socket.destroy === putOff) {
      if (own) Object.defineProperty(socket, 'destroy', own)
      else delete (socket as { destroy?: unknown }).destroy
    }
    if (asked) socket.destroy()
  }
}

/** Sockets whose destroy deferDestroy() is putting off. */
const deferring = new WeakSet<Socket>()

/** writeHead(status, [reason], [headers]) applied now, as Node would: invalid input throws in the handler. */
function applyWriteHead(res: ServerResponse, args: unknown[]): void {
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
    // The raw form [name, value, name, value, ...], as Node takes it: an odd length throws; each name replaces a
    // header set before, and repeats within the array are all kept.
    if (fields.length % 2 !== 0) {
      throw Object.assign(new TypeError("The argument 'headers' must have an even number of entries"), {
        code: 'ERR_INVALID_ARG_VALUE',
      })
    }
    for (let i = 0; i < fields.length; i += 2) res.removeHeader(fields[i] as string)
    for (let i = 0; i < fields.length; i += 2) {
      if (fields[i]) res.appendHeader(fields[i] as string, fields[i + 1] as string)
    }
  } else if (fields && typeof fields === 'object') {
    for (const [name, value] of Object.entries(fields)) if (name) res.setHeader(name, value as string)
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
