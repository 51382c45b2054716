/**
 * Work put off to the end of this turn of the event loop (its check phase, after every I/O callback of the
 * turn), in a fixed order: first what is sent to the nodes, then what is answered to clients.
 *
 * Sends wait so that one turn's node requests leave in one system call per node. Answers wait, and go after the
 * sends, for the latency of the requests that wait on a node under load. A response written in the middle of a
 * turn brings its client's next request in before the replies to the node requests this turn sends at its end;
 * the next turn then serves those HTTP requests first, and a response waiting on a node reply waits one turn
 * more. Released after the sends, the answers' next requests arrive behind the node replies. Measured in
 * bench/analysis.md (item 15). Idle, a turn is one request long, and the wait is one pass through the loop.
 * The order also carries a guarantee: a lock's release is a send, and a locked request's response an answer
 * (SessionEngine.answered()), so the client's next request, on any instance, comes after the release.
 *
 * The check phase is found with the setImmediate of node:timers, not the global one: test suites that fake the
 * global (Jest, sinon) would otherwise hold every response until they advance their clock.
 */

import { setImmediate } from 'node:timers'

type Task = () => void

const sends: Task[] = []
const answers: Task[] = []
let scheduled = false

/** Runs `task` at the end of this turn, before every answer. */
export function sendAtEndOfTurn(task: Task): void {
  sends.push(task)
  schedule()
}

/** Runs `task` at the end of this turn, after every send. */
export function answerAtEndOfTurn(task: Task): void {
  answers.push(task)
  schedule()
}

/** Settles at the end of this turn, after every send. */
export function endOfTurn(): Promise<void> {
  return new Promise((resolve) => answerAtEndOfTurn(resolve))
}

function schedule(): void {
  if (scheduled) return
  scheduled = true
  setImmediate(endTurn)
}

function endTurn(): void {
  runAll(sends)
  runAll(answers)
  // An answer that made a node request (a handler writing to the session after its response): it leaves now.
  runAll(sends)
  // Only now: what the tasks queued is either done or left for the next turn (an answer queued by an answer).
  scheduled = false
  if (sends.length > 0 || answers.length > 0) schedule()
}

/** Runs every task queued so far; one that throws does not keep the others from running. */
function runAll(tasks: Task[]): void {
  if (tasks.length === 0) return
  for (const task of tasks.splice(0)) {
    try {
      task()
    } catch (error) {
      // As it would have been from its own setImmediate: an uncaught exception.
      queueMicrotask(() => {
        throw error
      })
    }
  }
}
