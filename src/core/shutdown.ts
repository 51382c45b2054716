/**
 * One handler of SIGTERM and SIGINT for every sticky store with asynchronous backups in this process, so their
 * queued writes (already acknowledged) are not lost in a deployment: orchestrators send SIGTERM, PM2 and a
 * terminal's Ctrl-C send SIGINT.
 *
 * The handler is prepended, so it runs before any of the application's: at that moment it can tell whether the
 * application handles the signal itself. If it does, the application decides when to exit (and should await
 * `close()`, which waits for the same writes); the handler only starts the flush. If it does not, Node's
 * default would be to die at once: the handler flushes every store, then lets the signal take its default
 * course. A second signal during that flush (Ctrl-C pressed again) takes its course at once.
 */
type Flush = () => Promise<unknown>
type Signal = 'SIGTERM' | 'SIGINT'

const SIGNALS: readonly Signal[] = ['SIGTERM', 'SIGINT']
const flushes = new Set<Flush>()
const handlers: Readonly<Record<Signal, () => void>> = {
  SIGTERM: () => onSignal('SIGTERM'),
  SIGINT: () => onSignal('SIGINT'),
}
/** Whether a flush that will end in the signal's default course is under way. */
let exiting = false

function onSignal(signal: Signal): void {
  const applicationHandlesIt = process.listenerCount(signal) > 1
  if (applicationHandlesIt) {
    void flushAll()
    return
  }
  if (exiting) {
    takeCourse(signal)
    return
  }
  exiting = true
  void flushAll().then(() => takeCourse(signal))
}

function flushAll(): Promise<unknown> {
  return Promise.allSettled([...flushes].map((flush) => flush()))
}

/** Leaves the signal to whatever else listens, or to Node's default (the process ends). */
function takeCourse(signal: Signal): void {
  for (const each of SIGNALS) process.off(each, handlers[each])
  process.kill(process.pid, signal)
}

/** Registers a flush to run on SIGTERM and SIGINT; returns its unregistration. */
export function flushOnSignals(flush: Flush): () => void {
  if (flushes.size === 0) for (const signal of SIGNALS) process.prependListener(signal, handlers[signal])
  flushes.add(flush)
  return () => {
    flushes.delete(flush)
    if (flushes.size === 0) for (const signal of SIGNALS) process.off(signal, handlers[signal])
  }
}
