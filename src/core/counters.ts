/** What the engine and the store count; shared by both, read through the adapters' stats(). */
export interface SessionCounters {
  locksAcquired: number
  lockTimeouts: number
  merges: number
  mergeConflicts: number
  /** Stored copies that failed their integrity check, decryption or deserialization. */
  corruptSessions: number
  /** Reads answered from the negative cache: an expired or destroyed id presented again. */
  knownAbsentHits: number
}

export function newCounters(): SessionCounters {
  return {
    locksAcquired: 0,
    lockTimeouts: 0,
    merges: 0,
    mergeConflicts: 0,
    corruptSessions: 0,
    knownAbsentHits: 0,
  }
}
