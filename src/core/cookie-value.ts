import { sign, unsign } from 'cookie-signature'

/** Longest cookie value worth looking at; a signed id is far shorter. Bounds work on hostile input. */
const MAX_COOKIE_VALUE = 200
/** Verified cookie values remembered per app; past this many, the memory starts over. */
const REMEMBERED_VALUES = 10_000

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

/**
 * verifiedId() for one app's secrets, remembering the values it verified. A client sends the same cookie on every
 * request, and its HMAC was the largest single cost of reading a session id (about 7 µs of a 250 µs request
 * under load, bench:profile). Only values that verified are remembered, so a forged or tampered one is checked
 * every time; an app's secrets do not change while it runs. Bounded: a flood of valid cookies only costs their
 * HMACs again, and each entry holds copies of its strings, never the header they came in.
 */
export class CookieVerifier {
  readonly #secrets: readonly string[]
  readonly #verified = new Map<string, PresentedId>()

  constructor(secrets: readonly string[]) {
    this.#secrets = secrets
  }

  idOf(raw: string | undefined): PresentedId | undefined {
    // Too long to be ours: refused before a lookup would hash all of it. Not a string: a cookie parser's object
    // can answer a name such as `constructor` from its prototype when the header has no such cookie.
    if (typeof raw !== 'string' || raw.length > MAX_COOKIE_VALUE) return undefined
    const known = this.#verified.get(raw)
    if (known) return known
    const presented = verifiedId(raw, this.#secrets)
    if (presented) {
      if (this.#verified.size >= REMEMBERED_VALUES) this.#verified.clear()
      // Copies: the parsed value (and the id cut from it) are slices of the request's whole Cookie header, which
      // V8 keeps alive for as long as a slice is kept. Up to 200 characters each, so the memory holds at most
      // about 10 000 x 0.6 KB however large the headers that carried them.
      this.#verified.set(copyOf(raw), { id: copyOf(presented.id), resign: presented.resign })
    }
    return presented
  }
}

/** A string of its own: not a view of the larger string it was cut from. */
function copyOf(text: string): string {
  return Buffer.from(text, 'utf8').toString('utf8')
}
