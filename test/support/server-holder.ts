// Run as a child process by test/harness.test.ts: starts a memcached through the harness, prints
// `PID <pid>` for it, and waits to be killed.
import { startMemcached } from './memcached.js'

const server = await startMemcached()
process.stdout.write(`PID ${server.pid}\n`)
setInterval(() => {}, 60_000)
