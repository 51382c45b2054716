import { hash } from 'node:crypto'

export interface StorageKeys {
  /** The hash of the id's random part: names the session in every key, in stored records' tags and in logs. */
  readonly digest: string
  readonly primary: string
  readonly backup: string
  /** The session's lock (non-sticky locking modes). */
  readonly lock: string
  /** A mark left by a sticky logout: an instance still holding the session in memory must not write it back. */
  readonly gone: string
}

/** Keys computed lately: a request asks for its session's keys several times (read, lock, write, release). */
const recentKeys = new Map<string, StorageKeys>()
const RECENT_KEYS = 1024

/**
 * Cache keys come from a hash of the random part of the id, never the id itself: a dump of the cache yields no
 * usable cookie. The node id is not part of the key, so a relocated session keeps its keys.
 */
export function storageKeys(prefix: string, random: string): StorageKeys {
  const cacheKey = `${prefix}\0${random}`
  let keys = recentKeys.get(cacheKey)
  if (keys === undefined) {
    // The one-shot hash: no Hash object per call.
    const digest = hash('sha256', random, 'base64url')
    keys = {
      digest,
      primary: `${prefix}${digest}`,
      backup: `${prefix}bak:${digest}`,
      lock: `${prefix}lock:${digest}`,
      gone: `${prefix}gone:${digest}`,
    }
    if (recentKeys.size >= RECENT_KEYS) recentKeys.clear()
    recentKeys.set(cacheKey, keys)
  }
  return keys
}

/** How a session is named in logs: a short hash, never the id (which is the bearer credential). */
export function logIdOf(random: string): string {
  return storageKeys('', random).digest.slice(0, 12)
}
