import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { memcachedBinary } from './memcached.js'
import { installed } from './process.js'
import { redisBinary } from './redis.js'

/**
 * Makes sure memcached, redis-server, saslpasswd2 and chromium are installed (installing Debian's packages when running as root), and
 * keeps a pid file that the teardown uses to kill any server or app instance a test worker left running, whatever happened to
 * the worker.
 */
export default function setup(): () => void {
  const missing = [
    memcachedBinary() ? '' : 'memcached',
    redisBinary() ? '' : 'redis-server',
    // saslpasswd2, for the memcached that requires SASL authentication; the PLAIN mechanism.
    installed('saslpasswd2') ? '' : 'sasl2-bin libsasl2-modules',
    // The demo page's test drives it through playwright-core (no browser download).
    installed('chromium') ? '' : 'chromium',
  ].filter(Boolean)
  if (missing.length > 0) {
    const packages = missing.join(' ')
    if (process.getuid?.() !== 0) {
      throw new Error(
        `${packages} not installed: run \`sudo apt-get install -y ${packages}\`, then the tests again`,
      )
    }
    execFileSync(
      'sh',
      ['-c', `apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ${packages}`],
      {
        stdio: 'inherit',
      },
    )
  }
  const dir = mkdtempSync(join(tmpdir(), 'session-failover-test-'))
  const pidFile = join(dir, 'pids')
  process.env.SF_TEST_PID_FILE = pidFile
  return () => {
    // Started ("123") and, once exited, struck off ("-123").
    const pids = new Set<number>()
    try {
      for (const line of readFileSync(pidFile, 'utf8').split('\n').filter(Boolean)) {
        if (line.startsWith('-')) pids.delete(Number(line.slice(1)))
        else pids.add(Number(line))
      }
    } catch {
      // no server was started
    }
    for (const pid of pids) {
      // Only a server still running: the pid of one that exited long ago may belong to another process now.
      if (!isServer(pid)) continue
      for (const signal of ['SIGCONT', 'SIGKILL'] as const) {
        try {
          process.kill(pid, signal)
        } catch {
          // already gone
        }
      }
    }
    rmSync(dir, { recursive: true, force: true })
  }
}

/** A test server, or a test's app instance (support/instance-main.ts), by its command line. */
function isServer(pid: number): boolean {
  try {
    const comm = readFileSync(`/proc/${pid}/comm`, 'utf8').trim()
    if (/^(memcached|redis-server|redis-sentinel)$/.test(comm)) return true
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('support/instance-main.ts')
  } catch {
    return false
  }
}
