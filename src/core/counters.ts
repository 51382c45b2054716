/** What one middleware counted since it started; read through stats(). Every field only grows. */
export interface SessionCounters {
  /** Requests that presented a session that was found. */
  requestsWithSession: number
  /** Requests that started a new session (none presented, or the one presented was not found). */
  requestsWithoutSession: number
  /** Requests whose session was unchanged, so nothing was written (at most a touch). */
  writesSkipped: number
  primaryWrites: number
  primaryWriteFailures: number
  backupWrites: number
  backupWriteFailures: number
  /** Sessions moved off a dead node (node failover). */
  relocations: number
  /** Sticky mode: sessions taken over from another instance (instance failover). */
  takeovers: number
  /** Sessions whose primary node answered without them (it restarted empty), restored from the backup. */
  restores: number
  locksAcquired: number
  /** Lock acquisitions that had to wait for another request. */
  lockWaits: number
  lockTimeouts: number
  merges: number
  mergeConflicts: number
  /** Stored copies that failed their integrity check, decryption or deserialization. */
  corruptSessions: number
  /** Stored copies skipped because another instance may read them (another store key, another serializer). */
  foreignRecords: number
  /** Reads answered from the negative cache: an expired or destroyed id presented again. */
  knownAbsentHits: number
  /** Requests presenting the old id of a session this instance moved, loaded under its new id. */
  movesFollowed: number
}

export function newCounters(): SessionCounters {
  return {
    requestsWithSession: 0,
    requestsWithoutSession: 0,
    writesSkipped: 0,
    primaryWrites: 0,
    primaryWriteFailures: 0,
    backupWrites: 0,
    backupWriteFailures: 0,
    relocations: 0,
    takeovers: 0,
    restores: 0,
    locksAcquired: 0,
    lockWaits: 0,
    lockTimeouts: 0,
    merges: 0,
    mergeConflicts: 0,
    corruptSessions: 0,
    foreignRecords: 0,
    knownAbsentHits: 0,
    movesFollowed: 0,
  }
}
