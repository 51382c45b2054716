import type { IncomingMessage, ServerResponse } from 'node:http'
import { setImmediate } from 'node:timers'
import { CookieVerifier } from '../core/cookie-value.js'
import type { OpenedSession } from '../core/engine.js'
import type { RequestFacts } from '../core/locking-policy.js'
import type { SessionSnapshot } from '../core/session-state.js'
import { createEngine, type Engine } from '../create-engine.js'
import { ClosedError } from '../errors.js'
import { operationsOf, type SessionOperations } from '../operator.js'
import { parseOptions, type SessionFailoverOptions } from '../options.js'
import { newSessionCookie, type SessionCookie, sessionCookieHeader } from '../session-cookie.js'
import { appendSessionCookie, isSecure, readSessionId, requestPath } from './cookies.js'
import { toDictionaryMode } from './dictionary-mode.js'
import { type ApplyHeaders, holdResponse } from './hold-response.js'
import { RequestStore, type SessionRequest } from './request-store.js'
import { afterHandshake, appendStandInCookie, commitOnUpgrade, isUpgradeStandIn } from './upgrade-response.js'

export interface SessionFailoverMiddleware extends SessionOperations {
  (req: IncomingMessage, res: ServerResponse, next: (error?: unknown) => void): void
}

/** Keeps an upgrade's connection error from ending the process while its session is opened. */
const ignoreError = (): void => {}

/**
 * Express middleware with express-session's API (req.session, req.sessionID, save/regenerate/destroy/reload/
 * touch) whose sessions live on two memcached nodes and survive either one dying.
 */
export function sessionFailover(options: SessionFailoverOptions<IncomingMessage>): SessionFailoverMiddleware {
  const config = parseOptions(options)
  const engine: Engine = createEngine(config)
  const cookiePath = config.cookie.path ?? '/'
  const verifier = new CookieVerifier(config.secrets)
  const newCookie = (req: SessionRequest): SessionCookie =>
    newSessionCookie(config.cookie, isSecure(req, config.proxy))

  const middleware = (
    incoming: IncomingMessage,
    res: ServerResponse,
    next: (error?: unknown) => void,
  ): void => {
    const req = incoming as SessionRequest
    if (engine.closed) {
      next(new ClosedError('session-failover was closed; no session can be served'))
      return
    }
    const path = requestPath(req)
    if (req.session || !path.startsWith(cookiePath)) {
      next()
      return
    }
    const presented = readSessionId(req.headers.cookie, config.name, verifier)
    const request: RequestFacts = { method: req.method ?? 'GET', path, raw: req, route: undefined }

    const begin = ({ state, content }: OpenedSession): void => {
      toDictionaryMode(req)
      toDictionaryMode(res)
      const store = new RequestStore(req, engine.session, state, newCookie)
      req.sessionStore = store
      try {
        if (content) store.inflate(content)
        else store.generate()
      } catch (error) {
        // A stored session that express-session cannot take (a cookie it cannot rebuild): start afresh.
        config.logger.warn(
          { err: String(error) },
          'session-failover: unreadable session replaced by a new one',
        )
        state.renew(engine.session.store.newSessionId())
        store.generate()
      }

      const cookieHeaders = (
        setCookie: boolean,
        current: NonNullable<SessionRequest['session']>,
      ): ApplyHeaders | undefined => {
        req.sessionID = state.id
        if (!setCookie || (current.cookie.secure && !isSecure(req, config.proxy))) return undefined
        const header = sessionCookieHeader(
          config.name,
          state.id,
          config.secrets[0] as string,
          current.cookie as SessionCookie,
        )
        return () => {
          if (upgrade) appendStandInCookie(res, header)
          else if (!res.headersSent) appendSessionCookie(res, header)
        }
      }
      // Taken by commitNow when it could not finish at once, so commit does not serialize the session again.
      let pending: SessionSnapshot | undefined
      const commitNow = (final: boolean): { applyHeaders: ApplyHeaders | undefined } | undefined => {
        const current = req.session
        if (!current) return undefined
        try {
          current.touch()
          const snapshot = engine.session.snapshot(current, current.cookie)
          const done = engine.session.commitAtOnce(state, snapshot, final ? request : undefined)
          if (done) return { applyHeaders: cookieHeaders(done.setCookie, current) }
          pending = snapshot
        } catch {
          // Unserializable: commit() meets the same error, and answers it.
        }
        return undefined
      }
      // One async function for the whole commit: each one on a write's path allocates about 450 B.
      const commit = async (final: boolean): Promise<ApplyHeaders | undefined> => {
        try {
          // A save, destroy or regenerate the handler did not wait for lands first, and the snapshot is taken
          // after it: a regenerate's callback replaces req.session.
          const operations = engine.session.settled(state)
          if (operations) {
            await operations
            pending = undefined
          }
          const current = req.session
          if (!current) {
            await engine.session.commit(state, null)
            await engine.session.answered(state, final ? request : undefined)
            return undefined
          }
          let snapshot = pending
          pending = undefined
          if (!snapshot) {
            current.touch()
            snapshot = engine.session.snapshot(current, current.cookie)
          }
          const { setCookie } = await engine.session.commit(state, snapshot)
          // The lock is released now, not once the client has the response: the change is stored. Also once the
          // headers of a streamed response are out: a later change is merged, not held under a lock. Its
          // release leaves before the response, not waited for (answered()). Most responses need not wait at
          // all: no await then, which would cost every write a promise and a turn of the microtask queue.
          const leaving = engine.session.answered(state, final ? request : undefined)
          if (leaving) await leaving
          return cookieHeaders(setCookie, current)
        } catch (error) {
          // The error response, too, leaves after the lock's release.
          await engine.session.answered(state)
          throw error
        }
      }
      if (upgrade) {
        const commitOnce = commitOnUpgrade(
          req,
          res,
          engine.session,
          state,
          request,
          () => req.session,
          cookieHeaders,
          config.logger,
        )
        // express-ws routes the upgrade after its handshake, through a response nothing ends: stored at the end of
        // the turn this request is passed on in, so a change its ws route makes in that turn goes with it (later
        // ones are the application's save()).
        if (afterHandshake(req, res)) setImmediate(commitOnce)
      } else holdResponse(res, commit, next, commitNow, config.logger)
      // Failed or abandoned by the client: the lock goes (after any commit in flight) in every case.
      res.once('close', () => void engine.session.finish(state))
    }

    const upgrade = isUpgradeStandIn(req, res)
    // An upgrade's connection is nobody's until the handshake: one the client resets while this waits (for the
    // lock, or a slow node) would throw its error with no listener, and end the process.
    const socket = upgrade ? req.socket : undefined
    socket?.on('error', ignoreError)
    engine.session.open(presented, request).then(
      (opened) => {
        socket?.off('error', ignoreError)
        // A client that left while its request waited (for the lock) must not leave the lock behind. A stand-in
        // has no `destroyed`: its connection tells.
        if (res.destroyed || socket?.destroyed) {
          void engine.session.finish(opened.state)
          return
        }
        try {
          begin(opened)
        } catch (error) {
          next(error)
          return
        }
        next()
      },
      (error: unknown) => {
        socket?.off('error', ignoreError)
        next(error)
      },
    )
  }

  return Object.assign(
    middleware,
    // Async, so a bad timeout is a rejection (engine.close() throws it before closing anything).
    operationsOf(engine, async (options) => engine.close(options)),
  )
}
