import type { IncomingMessage, ServerResponse } from 'node:http'
import { parse, serialize } from 'cookie'
import { sign, unsign } from 'cookie-signature'

/** Longest cookie value worth looking at; a signed id is far shorter. Bounds work on hostile headers. */
const MAX_COOKIE_VALUE = 200

export interface PresentedId {
  readonly id: string
  /** Verified by a secret other than the first: the cookie is re-signed, so old secrets can be retired. */
  readonly resign: boolean
}

/** The session id from a signed `s:` cookie, verified against every secret; undefined for anything else. */
export function readSessionId(
  header: string | undefined,
  name: string,
  secrets: readonly string[],
): PresentedId | undefined {
  if (!header) return undefined
  const raw = parse(header)[name]
  if (!raw || raw.length > MAX_COOKIE_VALUE || !raw.startsWith('s:')) return undefined
  const signed = raw.slice(2)
  for (let index = 0; index < secrets.length; index++) {
    const id = unsign(signed, secrets[index] as string)
    if (id !== false) return { id, resign: index > 0 }
  }
  return undefined
}

export function appendSessionCookie(
  res: ServerResponse,
  name: string,
  id: string,
  secret: string,
  options: Parameters<typeof serialize>[2],
): void {
  const header = serialize(name, `s:${sign(id, secret)}`, options)
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
