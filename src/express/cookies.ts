import type { IncomingMessage, ServerResponse } from 'node:http'
import { parse, serialize } from 'cookie'
import { type PresentedId, signedValue, verifiedId } from '../core/cookie-value.js'

/** The session id from the signed session cookie in a Cookie header; undefined for anything else. */
export function readSessionId(
  header: string | undefined,
  name: string,
  secrets: readonly string[],
): PresentedId | undefined {
  return header ? verifiedId(parse(header)[name], secrets) : undefined
}

export function appendSessionCookie(
  res: ServerResponse,
  name: string,
  id: string,
  secret: string,
  options: Parameters<typeof serialize>[2],
): void {
  const header = serialize(name, signedValue(id, secret), options)
  const previous = res.getHeader('Set-Cookie')
  const all =
    previous === undefined
      ? [header]
      : Array.isArray(previous)
        ? [...previous, header]
        : [String(previous), header]
  res.setHeader('Set-Cookie', all)
}

/** express-session's rule: TLS socket, else X-Forwarded-Proto when `proxy` is true, else Express's req.secure. */
export function isSecure(
  req: IncomingMessage & { secure?: boolean },
  trustProxy: boolean | undefined,
): boolean {
  if ((req.socket as { encrypted?: boolean }).encrypted) return true
  if (trustProxy === false) return false
  if (trustProxy !== true) return req.secure === true
  const header = req.headers['x-forwarded-proto']
  const first = (Array.isArray(header) ? header[0] : header)?.split(',')[0]
  return first?.trim().toLowerCase() === 'https'
}

export function requestPath(req: IncomingMessage & { originalUrl?: string }): string {
  const url = req.originalUrl ?? req.url ?? '/'
  const query = url.indexOf('?')
  return query === -1 ? url : url.slice(0, query)
}
