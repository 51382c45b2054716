import type { IncomingMessage } from 'node:http'
import { serialize } from 'cookie'
import session from 'express-session'
import { signedValue } from './core/cookie-value.js'
import type { CookieOptions } from './options.js'

/** express-session's Cookie (maxAge, expires, options), which both adapters give their sessions. */
export type SessionCookie = session.Cookie & { readonly data: Record<string, unknown> }

/** express-session's Cookie class, with the constructor its type declarations keep private. */
const CookieClass = session.Cookie as unknown as new (options?: session.CookieOptions) => SessionCookie

/** A new session's cookie from the `cookie` option; 'auto' secure and sameSite follow the connection. */
export function newSessionCookie(options: Readonly<CookieOptions>, secureConnection: boolean): SessionCookie {
  const cookie = new CookieClass(options as session.CookieOptions)
  if ((options.secure as unknown) === 'auto') cookie.secure = secureConnection
  // SameSite=None is refused by browsers without Secure: on a secure connection, 'auto' sets both.
  if (options.sameSite === 'auto') {
    cookie.sameSite = secureConnection ? 'none' : 'lax'
    if (secureConnection) cookie.secure = true
  }
  return cookie
}

/** A stored session's cookie, as express-session's Store#createSession rebuilds it. */
export function storedSessionCookie(stored: Record<string, unknown>): SessionCookie {
  const cookie = new CookieClass()
  Object.assign(cookie, stored)
  if (typeof stored.expires === 'string') cookie.expires = new Date(stored.expires)
  cookie.originalMaxAge = (stored.originalMaxAge as number | null | undefined) ?? null
  return cookie
}

/**
 * express-session's rule for a secure connection, whatever the framework: a TLS socket; else, with `proxy: true`,
 * an https X-Forwarded-Proto; with `proxy: false`, never; left undefined, what the framework says (Express's
 * req.secure, Fastify's request.protocol: both follow their own trust-proxy setting).
 */
export function isSecureConnection(
  raw: IncomingMessage,
  trustProxy: boolean | undefined,
  frameworkSaysSecure: boolean,
): boolean {
  if ((raw.socket as { encrypted?: boolean }).encrypted) return true
  if (trustProxy === false) return false
  if (trustProxy !== true) return frameworkSaysSecure
  const header = raw.headers['x-forwarded-proto']
  const first = (Array.isArray(header) ? header[0] : header)?.split(',')[0]
  return first?.trim().toLowerCase() === 'https'
}

/**
 * The Set-Cookie header of the session cookie, serialized here for both adapters (the same bytes as
 * express-session), so no framework default (a cookie plugin's own signing or attributes) slips into it.
 */
export function sessionCookieHeader(name: string, id: string, secret: string, cookie: SessionCookie): string {
  return serialize(name, signedValue(id, secret), cookie.data as Parameters<typeof serialize>[2])
}
