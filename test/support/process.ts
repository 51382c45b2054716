import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { appendFileSync, readdirSync, readFileSync, readlinkSync } from 'node:fs'
import { createServer } from 'node:net'

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

/** Keeps a started server on the kind's list, and has it die with this process (see guard). */
export function track(kind: ServerKind, child: ChildProcess): ChildProcess {
  const list = running.get(kind) as Set<ChildProcess>
  list.add(child)
  child.once('exit', () => list.delete(child))
  return guard(child)
}

/**
 * Has a started process (a server, or an app instance) die with this process, a SIGKILL of it included (see
 * killedWithThisProcess), and records its pid in the run's pid file for the global teardown.
 */
export function guard(child: ChildProcess): ChildProcess {
  const pid = child.pid
  if (!pid) return child
  killedWithThisProcess(pid)
  const pidFile = process.env.SF_TEST_PID_FILE
  if (pidFile) appendFileSync(pidFile, `${pid}\n`)
  child.once('exit', () => {
    watchdog?.stdin?.write(`-${pid}\n`)
    // Struck off, as for the watchdog: once reused, the pid may be another run's server.
    if (pidFile) appendFileSync(pidFile, `-${pid}\n`)
  })
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

/**
 * Waits until `child` itself listens on `port`. A connection test would also accept another test's server that
 * took the port first (free ports are found by binding and closing, and workers run in parallel): the test would
 * then run against a server it does not control. Rejects if the child exits first (the port was taken).
 */
export async function waitUntilListening(port: number, child: ChildProcess): Promise<void> {
  const deadline = Date.now() + 5000
  while (Date.now() < deadline) {
    if (child.exitCode !== null || child.signalCode !== null) {
      throw new Error(
        `the server for port ${port} exited (${child.exitCode ?? child.signalCode}) before listening`,
      )
    }
    if (child.pid !== undefined && listensOn(child.pid, port)) return
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  throw new Error(`pid ${child.pid} did not listen on port ${port} within 5 s`)
}

/** Whether process `pid` holds a socket listening on TCP `port` (Linux's /proc, as waitForState). */
function listensOn(pid: number, port: number): boolean {
  const hexPort = port.toString(16).toUpperCase().padStart(4, '0')
  const inodes = new Set<string>()
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let lines: string[]
    try {
      lines = readFileSync(table, 'utf8').split('\n').slice(1)
    } catch {
      continue
    }
    for (const line of lines) {
      const fields = line.trim().split(/\s+/)
      // local_address is ADDR:PORT in hex; state 0A is LISTEN; the inode is the tenth field.
      if (fields[1]?.endsWith(`:${hexPort}`) && fields[3] === '0A' && fields[9]) inodes.add(fields[9])
    }
  }
  if (inodes.size === 0) return false
  let fds: string[]
  try {
    fds = readdirSync(`/proc/${pid}/fd`)
  } catch {
    return false
  }
  return fds.some((fd) => {
    try {
      const target = readlinkSync(`/proc/${pid}/fd/${fd}`)
      return target.startsWith('socket:[') && inodes.has(target.slice(8, -1))
    } catch {
      return false
    }
  })
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

/**
 * `spawnOn(port)` on a free port, once it listens there. A free port can be taken by another worker's server
 * before this one binds it: then another port.
 */
async function spawnListening(
  kind: ServerKind,
  spawnOn: (port: number) => ChildProcess,
): Promise<{ port: number; child: ChildProcess }> {
  for (let attempt = 1; ; attempt++) {
    const port = await freePort()
    const child = track(kind, spawnOn(port))
    try {
      await waitUntilListening(port, child)
      return { port, child }
    } catch (error) {
      child.kill('SIGKILL')
      await exited(child)
      if (attempt === 3) throw error
    }
  }
}

/** Starts a server on a free port with `spawnOn(port)`, and returns the handle tests kill and freeze it by. */
export async function startServerProcess(
  kind: ServerKind,
  spawnOn: (port: number) => ChildProcess,
): Promise<ServerProcess> {
  const started = await spawnListening(kind, spawnOn)
  const { port } = started
  let child = started.child
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
