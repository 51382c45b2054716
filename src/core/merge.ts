import type { SessionRecord } from './codec.js'
import type { SessionSerializer } from './serializer.js'

/**
 * The top-level keys one request set or deleted, with their values before the request: what a merge applies
 * onto the stored session instead of overwriting it.
 */
export interface SessionChanges {
  readonly set: ReadonlyMap<string, unknown>
  readonly deleted: readonly string[]
  /** Fingerprint of each changed key's value when the request read it (undefined: absent). */
  readonly before: ReadonlyMap<string, string | undefined>
}

/** `original` and `current`: session data in the serializer's format. */
export function changesBetween(
  serializer: SessionSerializer,
  original: Buffer,
  current: Buffer,
): SessionChanges {
  const was = serializer.deserialize(original, serializer.tag)
  const now = serializer.deserialize(current, serializer.tag)
  const set = new Map<string, unknown>()
  const before = new Map<string, string | undefined>()
  for (const [key, value] of Object.entries(now)) {
    const previous = fingerprintOf(serializer, was, key)
    if (serializer.fingerprint(value) !== previous) {
      set.set(key, value)
      before.set(key, previous)
    }
  }
  const deleted = Object.keys(was).filter((key) => !Object.hasOwn(now, key))
  for (const key of deleted) before.set(key, fingerprintOf(serializer, was, key))
  return { set, deleted, before }
}

/**
 * Applies `changes` onto the stored record's data. A conflict is a key this request changed that someone else
 * changed too since it was read: this request's value wins (last writer), and the conflict is counted.
 */
export function applyChanges(
  serializer: SessionSerializer,
  stored: Pick<SessionRecord, 'data' | 'format'>,
  changes: SessionChanges,
): { data: Buffer; conflicts: number } {
  const data = serializer.deserialize(stored.data, stored.format)
  let conflicts = 0
  for (const [key, was] of changes.before) {
    const now = fingerprintOf(serializer, data, key)
    const mine = changes.set.has(key) ? serializer.fingerprint(changes.set.get(key)) : undefined
    if (now !== was && now !== mine) conflicts++
  }
  // defineProperty, not assignment: a key named __proto__ must stay data, never become the prototype.
  for (const [key, value] of changes.set) {
    Object.defineProperty(data, key, { value, enumerable: true, writable: true, configurable: true })
  }
  for (const key of changes.deleted) delete data[key]
  return { data: serializer.serialize(data), conflicts }
}

function fingerprintOf(
  serializer: SessionSerializer,
  data: Record<string, unknown>,
  key: string,
): string | undefined {
  return Object.hasOwn(data, key) ? serializer.fingerprint(data[key]) : undefined
}
