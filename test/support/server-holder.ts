// Run as a child process by test/harness.test.ts: starts a memcached and an app instance through the harness,
// prints `PID <pid>` for each, and waits to be killed.
import { startAppProcess } from './instance.js'
import { startMemcached } from './memcached.js'

const server = await startMemcached()
process.stdout.write(`PID ${server.pid}\n`)
const app = await startAppProcess({
  secret: 'a secret long enough for the harness',
  nodes: `n1:127.0.0.1:${server.port}`,
})
process.stdout.write(`PID ${app.pid}\n`)
setInterval(() => {}, 60_000)
