import { type IncomingMessage, ServerResponse } from 'node:http'
import type { SessionEngine } from '../core/engine.js'
import type { RequestFacts } from '../core/locking-policy.js'
import type { SessionSnapshot, SessionState } from '../core/session-state.js'
import type { Logger } from '../logger.js'
import { appendSessionCookie } from './cookies.js'
import type { ApplyHeaders } from './hold-response.js'
import type { SessionRequest } from './request-store.js'

type AnyFunction = (...args: unknown[]) => unknown
type ExpressSession = NonNullable<SessionRequest['session']>

/**
 * Whether `res` stands in for the response to a WebSocket upgrade, through which nothing is sent:
 * - socket.io's (engine.io's) on `io.engine.use(sessions)`, an object with setHeader, writeHead and end. Its
 *   writeHead() takes no status and marks the moment ws writes the 101, synchronously, with the headers set so far.
 * - express-ws's, a ServerResponse with no connection, made after the 101 went out (`afterHandshake`): it never
 *   ends and never closes, so holding it would keep the session's lock and state for as long as the process runs.
 * A real response to an upgrade request (a server with no 'upgrade' listener) is held as any other.
 */
export function isUpgradeStandIn(req: IncomingMessage, res: ServerResponse): boolean {
  return req.headers.upgrade !== undefined && (!(res instanceof ServerResponse) || afterHandshake(req, res))
}

/**
 * express-ws's stand-in: the handshake is done, and nothing will call its writeHead() or end() to say so. Only
 * for a request Node gave to the 'upgrade' event: a request queued behind another on a keep-alive connection
 * also has a response with no socket yet, and is answered.
 */
export function afterHandshake(req: IncomingMessage, res: ServerResponse): boolean {
  // Node sets `upgrade` on every request it parses, true for those it gives to the 'upgrade' event.
  return (req as { upgrade?: boolean }).upgrade === true && res instanceof ServerResponse && !res.socket
}

/** Spellings of the header for socket.io's stand-in, which writes each key it was given as one line. */
const SET_COOKIE_SPELLINGS = ['Set-Cookie', 'set-cookie', 'SET-COOKIE', 'Set-cookie', 'set-Cookie']

/**
 * The session cookie on an upgrade's stand-in. socket.io's joins an array into one line ("a; Path=/,connect.sid=
 * ..."), which breaks both cookies; its header names are case-sensitive keys, so a spelling nobody used yet is a
 * line of its own. A stand-in that ignores case has none free, and express-ws's is a ServerResponse: the array
 * then, as for any response.
 */
export function appendStandInCookie(res: ServerResponse, header: string): void {
  const standIn = res as Pick<ServerResponse, 'getHeader' | 'setHeader'>
  const free =
    res instanceof ServerResponse
      ? undefined
      : SET_COOKIE_SPELLINGS.find((name) => standIn.getHeader(name) === undefined)
  if (free) standIn.setHeader(free, header)
  else appendSessionCookie(res, header)
}

/**
 * Commits the upgrade's session once, when the stand-in's writeHead() (or end(): a middleware refusing the
 * upgrade) is called. Nothing can be held back there, as ws writes the 101 right after writeHead() returns: the
 * cookie is decided at once and goes with the 101, the session is stored in the background, and a lock the
 * upgrade took is released after that, not when the WebSocket closes hours later. A store that fails cuts the
 * WebSocket, as a held response's connection is cut, so the client reconnects rather than go on with a change
 * that was not stored. Nothing here may throw: socket.io calls writeHead() in a promise chain, where an error
 * would go unhandled.
 */
export function commitOnUpgrade(
  req: IncomingMessage,
  res: ServerResponse,
  engine: SessionEngine,
  state: SessionState,
  request: RequestFacts,
  session: () => ExpressSession | undefined,
  cookieHeaders: (setCookie: boolean, session: ExpressSession) => ApplyHeaders | undefined,
  logger: Logger,
): () => void {
  const cut = (error: unknown): void => {
    // The stand-in's socket (socket.io's), else the request's: the upgraded connection either way.
    ;(res.socket ?? req.socket)?.destroy()
    try {
      logger.error(
        { err: String(error) },
        'session-failover: the session of a WebSocket upgrade could not be stored; connection cut',
      )
    } catch {
      // Nothing is left to tell: the connection is already cut.
    }
  }
  let committed = false
  const commitOnce = (): void => {
    if (committed) return
    committed = true
    const current = session()
    let snapshot: SessionSnapshot | null = null
    try {
      if (current) {
        current.touch()
        snapshot = engine.snapshot(current, current.cookie)
      }
    } catch (error) {
      // Unserializable. The cut closes the stand-in, whose 'close' releases the lock (the middleware's listener).
      cut(error)
      return
    }
    const setCookie = engine.commitDetached(state, snapshot, request, cut)
    try {
      if (current) cookieHeaders(setCookie, current)?.()
    } catch (error) {
      logger.warn({ err: String(error) }, 'session-failover: no session cookie on a WebSocket upgrade')
    }
  }
  const writeHead = res.writeHead as AnyFunction
  const end = res.end as AnyFunction
  res.writeHead = function writeHeadAfterCommit(this: ServerResponse, ...args: unknown[]) {
    commitOnce()
    return writeHead.apply(this, args)
  } as ServerResponse['writeHead']
  res.end = function endAfterCommit(this: ServerResponse, ...args: unknown[]) {
    commitOnce()
    return end.apply(this, args)
  } as ServerResponse['end']
  return commitOnce
}
