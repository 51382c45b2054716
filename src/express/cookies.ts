import type { IncomingMessage, ServerResponse } from 'node:http'
import { parse } from 'cookie'
import type { CookieVerifier, PresentedId } from '../core/cookie-value.js'
import { isSecureConnection } from '../session-cookie.js'

/** The session id from the signed session cookie in a Cookie header; undefined for anything else. */
export function readSessionId(
  header: string | undefined,
  name: string,
  verifier: CookieVerifier,
): PresentedId | undefined {
  return header ? verifier.idOf(parse(header)[name]) : undefined
}

export function appendSessionCookie(res: ServerResponse, header: string): void {
  const previous = res.getHeader('Set-Cookie')
  const all =
    previous === undefined
      ? [header]
      : Array.isArray(previous)
        ? [...previous, header]
        : [String(previous), header]
  res.setHeader('Set-Cookie', all)
}

export function isSecure(
  req: IncomingMessage & { secure?: boolean },
  trustProxy: boolean | undefined,
): boolean {
  return isSecureConnection(req, trustProxy, req.secure === true)
}

export function requestPath(req: IncomingMessage & { originalUrl?: string }): string {
  const url = req.originalUrl ?? req.url ?? '/'
  // The absolute form (`GET http://host/cart`, as proxies send it) has its path after the authority; Express
  // routes it by that path, so the session must be there too.
  if (url.charCodeAt(0) !== 47 /* / */) return absolutePath(url)
  const query = url.indexOf('?')
  return query === -1 ? url : url.slice(0, query)
}

function absolutePath(url: string): string {
  try {
    return new URL(url, 'http://localhost').pathname
  } catch {
    return '/'
  }
}
