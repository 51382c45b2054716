import { type ChildProcess, spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import type { SessionFailoverOptions } from '../../src/index.js'
import type { ShopApp } from './app.js'
import { announcedPort, guard } from './process.js'

const main = fileURLToPath(new URL('./instance-main.ts', import.meta.url))
const running = new Set<ChildProcess>()

/** A shop app in a child process: `url` to send requests to, and a process to kill. */
export interface AppProcess extends Pick<ShopApp, 'url'> {
  readonly pid: number
  /** SIGKILL, as a crash. */
  kill(): Promise<void>
  /** SIGTERM (a deployment) or SIGINT (Ctrl-C, PM2); resolves with the exit code or signal once the process is gone. */
  terminate(signal?: 'SIGTERM' | 'SIGINT'): Promise<number | string | null>
}

export async function startAppProcess(
  options: SessionFailoverOptions,
  { ownSigtermHandler = false } = {},
): Promise<AppProcess> {
  const child = spawn(process.execPath, ['--import', 'tsx', main], {
    env: {
      ...process.env,
      SF_OPTIONS: JSON.stringify(options),
      ...(ownSigtermHandler ? { SF_OWN_SIGTERM: '1' } : {}),
    },
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  // Killed with the test worker however it ends, as the servers are: an app instance left running would keep
  // its nodes' connections, and its port, after the run.
  guard(child)
  running.add(child)
  const exited = new Promise<number | string | null>((resolve) =>
    child.once('exit', (code, signal) => {
      running.delete(child)
      resolve(code ?? signal)
    }),
  )
  const port = await announcedPort(child, 'app instance', 15_000).catch((error: unknown) => {
    child.kill('SIGKILL')
    throw error
  })
  return {
    url: `http://127.0.0.1:${port}`,
    pid: child.pid ?? -1,
    async kill() {
      child.kill('SIGKILL')
      await exited
    },
    async terminate(signal = 'SIGTERM') {
      child.kill(signal)
      return exited
    },
  }
}

export async function stopAllAppProcesses(): Promise<void> {
  const children = [...running]
  for (const child of children) child.kill('SIGKILL')
  await Promise.all(
    children.map((child) =>
      child.exitCode !== null || child.signalCode !== null
        ? undefined
        : new Promise((resolve) => child.once('exit', resolve)),
    ),
  )
}
