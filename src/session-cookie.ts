import session from 'express-session'

/** express-session's Cookie (maxAge, expires, options), which both adapters give their sessions. */
export type SessionCookie = session.Cookie & { readonly data: Record<string, unknown> }

/** express-session's Cookie class, with the constructor its type declarations keep private. */
const CookieClass = session.Cookie as unknown as new (options?: session.CookieOptions) => SessionCookie

/** A new session's cookie from the `cookie` option; 'auto' secure and sameSite follow the connection. */
export function newSessionCookie(
  options: Readonly<session.CookieOptions>,
  secureConnection: boolean,
): SessionCookie {
  const cookie = new CookieClass(options)
  if ((options.secure as unknown) === 'auto') cookie.secure = secureConnection
  if ((options.sameSite as unknown) === 'auto') cookie.sameSite = secureConnection ? 'none' : 'lax'
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
