/**
 * One SIGTERM handler for every sticky store with asynchronous backups in this process, so their queued writes
 * (already acknowledged) are not lost in a deployment.
 *
 * The handler is prepended, so it runs before any of the application's: at that moment it can tell whether the
 * application handles SIGTERM itself. If it does, the application decides when to exit (and should await
 * `close()`, which waits for the same writes); the handler only starts the flush. If it does not, Node's
 * default would be to die at once: the handler flushes every store, then lets the signal take its default
 * course.
 */
type Flush = () => Promise<unknown>

const flushes = new Set<Flush>()

function onSigterm(): void {
  const applicationHandlesIt = process.listenerCount('SIGTERM') > 1
  void Promise.allSettled([...flushes].map((flush) => flush())).then(() => {
    if (applicationHandlesIt) return
    process.off('SIGTERM', onSigterm)
    process.kill(process.pid, 'SIGTERM')
  })
}

/** Registers a flush to run on SIGTERM; returns its unregistration. */
export function flushOnSigterm(flush: Flush): () => void {
  if (flushes.size === 0) process.prependListener('SIGTERM', onSigterm)
  flushes.add(flush)
  return () => {
    flushes.delete(flush)
    if (flushes.size === 0) process.off('SIGTERM', onSigterm)
  }
}
