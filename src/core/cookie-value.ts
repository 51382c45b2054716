import { sign, unsign } from 'cookie-signature'

/** Longest cookie value worth looking at; a signed id is far shorter. Bounds work on hostile input. */
const MAX_COOKIE_VALUE = 200

export interface PresentedId {
  readonly id: string
  /** Verified by a secret other than the first: the cookie is re-signed, so old secrets can be retired. */
  readonly resign: boolean
}

/**
 * The cookie value express-session writes, `s:<id>.<signature>`, so Express and Fastify apps sharing nodes and
 * secrets read each other's sessions.
 */
export function signedValue(id: string, secret: string): string {
  return `s:${sign(id, secret)}`
}

/** The session id in a signed cookie value, verified against every secret; undefined for anything else. */
export function verifiedId(raw: string | undefined, secrets: readonly string[]): PresentedId | undefined {
  if (!raw || raw.length > MAX_COOKIE_VALUE || !raw.startsWith('s:')) return undefined
  const signed = raw.slice(2)
  for (let index = 0; index < secrets.length; index++) {
    const id = unsign(signed, secrets[index] as string)
    if (id !== false) return { id, resign: index > 0 }
  }
  return undefined
}
