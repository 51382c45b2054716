import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { appendFileSync, readFileSync } from 'node:fs'
import { connect, createServer } from 'node:net'

/**
 * The process side of every test server (memcached, redis-server, sentinel): a free port, waiting until it
 * listens, SIGKILL, SIGSTOP/SIGCONT, restart on the same port, and a record of every pid in the run's pid file
 * so the global teardown can kill what a crashed worker left behind.
 */
export interface ServerProcess {
  readonly port: number
  readonly pid: number
  /** SIGKILL, as a crash. Resolves when the process is gone. */
  kill(): Promise<void>
  /** SIGSTOP; resolves once the kernel reports the process stopped (signals are delivered asynchronously). */
  freeze(): Promise<void>
  thaw(): void
  /** A new, empty server on the same port. */
  restart(): Promise<void>
}

export type ServerKind = 'memcached' | 'redis'

const running = new Map<ServerKind, Set<ChildProcess>>([
  ['memcached', new Set()],
  ['redis', new Set()],
])

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const address = server.address()
      const port = typeof address === 'object' && address ? address.port : 0
      server.close(() => resolve(port))
    })
  })
}

/** The path of an installed program, or '' when it is missing. */
export function installed(program: string): string {
  try {
    return execFileSync('sh', ['-c', `command -v ${program}`], { encoding: 'utf8' }).trim()
  } catch {
    return ''
  }
}

/**
 * Keeps a started process on the kind's list and in the pid file, and has it die with this process (see
 * killedWithThisProcess).
 */
export function track(kind: ServerKind, child: ChildProcess): ChildProcess {
  const list = running.get(kind) as Set<ChildProcess>
  list.add(child)
  const pid = child.pid
  if (pid) killedWithThisProcess(pid)
  child.once('exit', () => {
    list.delete(child)
    if (pid) watchdog?.stdin?.write(`-${pid}\n`)
  })
  const pidFile = process.env.SF_TEST_PID_FILE
  if (pidFile && pid) appendFileSync(pidFile, `${pid}\n`)
  return child
}

/**
 * A shell that outlives this process: it reads pids on a pipe from it (`-pid` when one exited on its own, so
 * that a reused pid is never hit) and, once the pipe closes, SIGKILLs those left. The pipe closes however this
 * process ends, a SIGKILL included (no exit handler runs then): a test runner killed by CI, a benchmark stopped
 * by ^C, the demo killed. In its own process group, so a signal sent to this one's group does not stop it first.
 */
const WATCHDOG = `pids=" "
while read -r line; do
  case $line in
    -*) keep=" "; for p in $pids; do [ "$p" = "\${line#-}" ] || keep="$keep$p "; done; pids=$keep ;;
    *) pids="$pids$line " ;;
  esac
done
[ "$pids" = " " ] || kill -9 $pids 2>/dev/null
exit 0`

let watchdog: ChildProcess | undefined

function killedWithThisProcess(pid: number): void {
  if (!watchdog) {
    try {
      const started = spawn('sh', ['-c', WATCHDOG], { stdio: ['pipe', 'ignore', 'ignore'], detached: true })
      // A safety net that failed (no process or file left to start it) must not bring down what it guards.
      started.on('error', () => {})
      started.stdin?.on('error', () => {})
      started.once('exit', () => {
        if (watchdog === started) watchdog = undefined
      })
      // Neither it nor its pipe keeps this process alive.
      started.unref()
      ;(started.stdin as unknown as { unref(): void }).unref()
      watchdog = started
    } catch {
      return
    }
  }
  watchdog.stdin?.write(`${pid}\n`)
}

export async function waitUntilListening(port: number, child: ChildProcess): Promise<void> {
  const deadline = Date.now() + 5000
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`the server for port ${port} exited with ${child.exitCode}`)
    const ok = await new Promise<boolean>((resolve) => {
      const socket = connect(port, '127.0.0.1')
      socket.once('connect', () => {
        socket.destroy()
        resolve(true)
      })
      socket.once('error', () => resolve(false))
    })
    if (ok) return
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  throw new Error(`nothing listened on port ${port} within 5 s`)
}

function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve()
  return new Promise((resolve) => child.once('exit', () => resolve()))
}

/** Polls /proc/<pid>/stat until the process is in `state` (e.g. 'T' for stopped). */
async function waitForState(child: ChildProcess, state: string): Promise<void> {
  const deadline = Date.now() + 5000
  while (Date.now() < deadline) {
    const stat = readFileSync(`/proc/${child.pid}/stat`, 'utf8')
    // The state follows the command name, which is in parentheses.
    if (stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === state) return
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
  throw new Error(`pid ${child.pid} did not reach state ${state}`)
}

/**
 * The port a child process announces with `LISTENING <port>` on its stdout (the shop, bench and demo apps);
 * rejects if it exits first, or after `timeoutMs`.
 */
export function announcedPort(child: ChildProcess, name: string, timeoutMs: number): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    let output = ''
    const timer = setTimeout(
      () => reject(new Error(`${name} did not start within ${timeoutMs} ms`)),
      timeoutMs,
    )
    child.stdout?.on('data', (chunk: Buffer) => {
      output += chunk.toString()
      const match = /LISTENING (\d+)/.exec(output)
      if (match) {
        clearTimeout(timer)
        resolve(Number(match[1]))
      }
    })
    child.once('exit', (code, signal) => {
      clearTimeout(timer)
      reject(new Error(`${name} exited (${code ?? signal}) before listening`))
    })
  })
}

/** Starts a server on a free port with `spawnOn(port)`, and returns the handle tests kill and freeze it by. */
export async function startServerProcess(
  kind: ServerKind,
  spawnOn: (port: number) => ChildProcess,
): Promise<ServerProcess> {
  const port = await freePort()
  let child = track(kind, spawnOn(port))
  await waitUntilListening(port, child)
  return {
    port,
    get pid() {
      return child.pid ?? -1
    },
    async kill() {
      child.kill('SIGKILL')
      await exited(child)
    },
    async freeze() {
      child.kill('SIGSTOP')
      await waitForState(child, 'T')
    },
    thaw() {
      child.kill('SIGCONT')
    },
    async restart() {
      child.kill('SIGKILL')
      await exited(child)
      child = track(kind, spawnOn(port))
      await waitUntilListening(port, child)
    },
  }
}

/** Kills every server of `kind` this process started; thaws first so SIGKILL is not left pending on a stopped one. */
export async function stopAll(kind: ServerKind): Promise<void> {
  const children = [...(running.get(kind) ?? [])]
  for (const child of children) {
    child.kill('SIGCONT')
    child.kill('SIGKILL')
  }
  await Promise.all(children.map(exited))
}
