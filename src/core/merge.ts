/**
 * The top-level keys one request set or deleted, with their values before the request: what a merge applies
 * onto the stored session instead of overwriting it.
 */
export interface SessionChanges {
  readonly set: ReadonlyMap<string, unknown>
  readonly deleted: readonly string[]
  /** JSON of each changed key's value when the request read it (undefined: absent). */
  readonly before: ReadonlyMap<string, string | undefined>
}

export function changesBetween(originalJson: string, currentJson: string): SessionChanges {
  const original = JSON.parse(originalJson) as Record<string, unknown>
  const current = JSON.parse(currentJson) as Record<string, unknown>
  const set = new Map<string, unknown>()
  const before = new Map<string, string | undefined>()
  for (const [key, value] of Object.entries(current)) {
    const was = jsonOf(original, key)
    if (JSON.stringify(value) !== was) {
      set.set(key, value)
      before.set(key, was)
    }
  }
  const deleted = Object.keys(original).filter((key) => !Object.hasOwn(current, key))
  for (const key of deleted) before.set(key, jsonOf(original, key))
  return { set, deleted, before }
}

/**
 * Applies `changes` onto the stored data. A conflict is a key this request changed that someone else changed
 * too since it was read: this request's value wins (last writer), and the conflict is counted.
 */
export function applyChanges(
  storedJson: string,
  changes: SessionChanges,
): { dataJson: string; conflicts: number } {
  const stored = JSON.parse(storedJson) as Record<string, unknown>
  let conflicts = 0
  for (const [key, was] of changes.before) {
    const now = jsonOf(stored, key)
    const mine = changes.set.has(key) ? JSON.stringify(changes.set.get(key)) : undefined
    if (now !== was && now !== mine) conflicts++
  }
  // defineProperty, not assignment: a key named __proto__ must stay data, never become the prototype.
  for (const [key, value] of changes.set) {
    Object.defineProperty(stored, key, { value, enumerable: true, writable: true, configurable: true })
  }
  for (const key of changes.deleted) delete stored[key]
  return { dataJson: JSON.stringify(stored), conflicts }
}

function jsonOf(data: Record<string, unknown>, key: string): string | undefined {
  return Object.hasOwn(data, key) ? JSON.stringify(data[key]) : undefined
}
