import { randomBytes } from 'node:crypto'

/**
 * Session id layout: `<random>-<nodeId>` or, in sticky mode, `<random>-<nodeId>.<route>` (Tomcat's jvmRoute:
 * the instance that owns the session, for a load balancer to route by). `<random>` is exactly RANDOM_LENGTH
 * base64url characters (144 bits from the CSPRNG). base64url itself contains '-', so the fixed length is what
 * makes the rest parse without ambiguity: the separator is always at index RANDOM_LENGTH, and node ids and
 * routes never contain '-' or '.'.
 */
const RANDOM_BYTES = 18
export const RANDOM_LENGTH = 24 // 18 bytes encode to exactly 24 base64url characters, no padding
const SEPARATOR = '-'
const ROUTE_SEPARATOR = '.'

/** Node ids and routes are short tokens that can never contain a separator; validated at start-up. */
export const NODE_ID_PATTERN = /^[A-Za-z0-9_]{1,32}$/
export const ROUTE_PATTERN = NODE_ID_PATTERN
const RANDOM_PATTERN = /^[A-Za-z0-9_-]{24}$/

export interface ParsedSessionId {
  /** The random part: stays the same when a session is relocated to another node. */
  readonly random: string
  /** The node holding the primary copy. */
  readonly nodeId: string
  /** The instance owning the session (sticky mode); undefined in non-sticky ids. */
  readonly route: string | undefined
}

export function newRandomPart(): string {
  return randomBytes(RANDOM_BYTES).toString('base64url')
}

export function formatSessionId(random: string, nodeId: string, route?: string): string {
  return route === undefined
    ? random + SEPARATOR + nodeId
    : random + SEPARATOR + nodeId + ROUTE_SEPARATOR + route
}

/**
 * Parses a session id strictly. Returns null for anything that is not exactly an id this library could have
 * issued; it says nothing about whether the node is configured (the ring checks that).
 */
export function parseSessionId(id: unknown): ParsedSessionId | null {
  if (typeof id !== 'string' || id.length < RANDOM_LENGTH + 2 || id.length > RANDOM_LENGTH + 67) return null
  if (id[RANDOM_LENGTH] !== SEPARATOR) return null
  const random = id.slice(0, RANDOM_LENGTH)
  const rest = id.slice(RANDOM_LENGTH + 1)
  const dot = rest.indexOf(ROUTE_SEPARATOR)
  const nodeId = dot === -1 ? rest : rest.slice(0, dot)
  const route = dot === -1 ? undefined : rest.slice(dot + 1)
  if (!RANDOM_PATTERN.test(random) || !NODE_ID_PATTERN.test(nodeId)) return null
  if (route !== undefined && !ROUTE_PATTERN.test(route)) return null
  return { random, nodeId, route }
}
