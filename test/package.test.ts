import { execFileSync } from 'node:child_process'
import {
  copyFileSync,
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'

const root = resolve(import.meta.dirname, '..')
const run = (command: string, args: string[], cwd: string) =>
  execFileSync(command, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 180_000 })

/** What a user gets from `npm install session-failover`: the packed tarball, installed into an empty app. */
describe('the npm package', () => {
  let app: string

  beforeAll(() => {
    app = mkdtempSync(join(tmpdir(), 'session-failover-pack-'))
    run('npm', ['pack', '--pack-destination', app, '--silent'], root)
    const tarball = readdirSync(app).find((name) => name.endsWith('.tgz')) as string
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'consumer', private: true }))
    run(
      'npm',
      [
        'install',
        '--no-audit',
        '--no-fund',
        '--prefer-offline',
        `./${tarball}`,
        'express@5',
        'fastify@5',
        'prom-client@15',
      ],
      app,
    )
  }, 240_000)

  afterAll(() => rmSync(app, { recursive: true, force: true }))

  it("installs with --engine-strict: no dependency of its own needs a newer Node than the package's engines", () => {
    // An Express-only app installs no peer; a dependency that declares a newer Node fails such an install.
    const strict = mkdtempSync(join(tmpdir(), 'session-failover-strict-'))
    try {
      const tarball = readdirSync(app).find((name) => name.endsWith('.tgz')) as string
      copyFileSync(join(app, tarball), join(strict, tarball))
      writeFileSync(join(strict, 'package.json'), JSON.stringify({ name: 'strict-consumer', private: true }))
      run(
        'npm',
        ['install', '--no-audit', '--no-fund', '--prefer-offline', '--engine-strict', `./${tarball}`],
        strict,
      )
      expect(existsSync(join(strict, 'node_modules/session-failover/dist/index.js'))).toBe(true)
    } finally {
      rmSync(strict, { recursive: true, force: true })
    }
  })

  it('ships only the build, the README and the license', () => {
    const files = run('tar', ['-tzf', readdirSync(app).find((name) => name.endsWith('.tgz')) as string], app)
      .split('\n')
      .filter(Boolean)
    expect(files).toContain('package/dist/index.js')
    expect(files).toContain('package/dist/index.d.ts')
    expect(files).toContain('package/dist/prometheus.js')
    expect(files).toContain('package/dist/prometheus.d.ts')
    expect(files).toContain('package/README.md')
    expect(files).toContain('package/LICENSE')
    expect(files.filter((file) => /package\/(src|test|examples|bench)\//.test(file))).toEqual([])
  })

  it('works from import and from require()', () => {
    writeFileSync(
      join(app, 'esm.mjs'),
      `import express from 'express'
import { sessionFailover, parseSessionId, ConfigError } from 'session-failover'
const app = express()
app.use(sessionFailover({ secret: 's', nodes: 'n1:127.0.0.1:1' }))
try { sessionFailover({ secret: '' }) } catch (e) { if (!(e instanceof ConfigError)) throw e }
console.log(parseSessionId('${'a'.repeat(24)}-n1').nodeId)
process.exit(0)
`,
    )
    writeFileSync(
      join(app, 'prometheus.mjs'),
      `import { Registry } from 'prom-client'
import { sessionFailover } from 'session-failover'
import { registerSessionMetrics } from 'session-failover/prometheus'
const registry = new Registry()
registerSessionMetrics(sessionFailover({ secret: 's', nodes: 'n1:127.0.0.1:1' }), { registry })
const text = await registry.metrics()
console.log(text.includes('session_failover_requests_total') ? 'metrics' : 'none')
process.exit(0)
`,
    )
    writeFileSync(
      join(app, 'cjs.cjs'),
      `const { sessionFailover, parseSessionId } = require('session-failover')
if (typeof sessionFailover !== 'function') throw new Error('no sessionFailover')
console.log(parseSessionId('${'b'.repeat(24)}-n2').nodeId)
`,
    )
    writeFileSync(
      join(app, 'fastify.mjs'),
      `import Fastify from 'fastify'
import { fastifySessionFailover } from 'session-failover/fastify'
const app = Fastify()
await app.register(fastifySessionFailover, { secret: 's', nodes: 'n1:127.0.0.1:1' })
await app.ready()
console.log(typeof app.sessionFailover.health)
await app.close()
`,
    )
    expect(run('node', ['esm.mjs'], app).trim()).toBe('n1')
    expect(run('node', ['fastify.mjs'], app).trim()).toBe('function')
    expect(run('node', ['prometheus.mjs'], app).trim()).toBe('metrics')
    expect(run('node', ['cjs.cjs'], app).trim()).toBe('n2')
  })

  it('has type declarations that type req.session like express-session, and request.session like @fastify/session', () => {
    writeFileSync(
      join(app, 'typed.ts'),
      `import express from 'express'
import { sessionFailover, parseSessionId, type SessionFailoverOptions } from 'session-failover'
declare module 'express-session' { interface SessionData { cart: string[] } }
// Through this package too, where express-session is not the application's own dependency (pnpm).
declare module 'session-failover' { interface SessionData { basket: string[] } }
// The README's socket.io example: socket.request is Node's request, typed with the session as socket.io's guide does.
import type { IncomingMessage } from 'node:http'
import type { Session, SessionData } from 'session-failover'
declare module 'http' { interface IncomingMessage { session: Session & Partial<SessionData> } }
const onSocket = (request: IncomingMessage) => request.session.reload((err) => {
  if (err) return
  request.session.cart = [...(request.session.cart ?? []), 'item']
  request.session.save()
})
void onSocket
const options: SessionFailoverOptions = {
  secret: ['a', 'b'],
  nodes: [{ id: 'n1', host: '127.0.0.1', port: 11211 }],
  cookie: { sameSite: 'auto', secure: 'auto' },
}
// A function lockingMode is given Node's request (the README's socket.io example).
const sessions = sessionFailover({ ...options, lockingMode: (req) => !req.url?.startsWith('/socket.io/') })
const app = express()
app.use(sessions)
app.get('/', (req, res) => {
  req.session.cart = ['x']
  req.session.basket = ['y']
  res.json(parseSessionId(req.sessionID)?.nodeId)
})
void sessions.close()
`,
    )
    const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc')
    const args = [
      '--noEmit',
      '--strict',
      '--module',
      'nodenext',
      '--moduleResolution',
      'nodenext',
      '--target',
      'es2022',
    ]
    expect(() => run('node', [tsc, ...args, 'typed.ts'], app)).not.toThrow()
    writeFileSync(
      join(app, 'typed-fastify.ts'),
      `import Fastify from 'fastify'
import { fastifySessionFailover } from 'session-failover/fastify'
import type { SessionFailoverOptions } from 'session-failover'
declare module 'fastify' { interface Session { user: { name: string } } }
// Generic code over the declared keys, as @fastify/session's set() takes it.
function put<K extends keyof import('fastify').Session>(
  session: import('fastify').FastifyRequest['session'],
  key: K,
  value: import('fastify').Session[K],
) {
  session.set(key, value)
}
const app = Fastify()
void app.register(fastifySessionFailover, {
  secret: 's',
  nodes: 'n1:127.0.0.1:1',
  lockingMode: (request) => request.routeOptions.url !== '/health',
})
// One options object for an Express app and a Fastify one.
const shared: SessionFailoverOptions = { secret: 's', nodes: 'n1:127.0.0.1:1', lockingMode: () => true }
void Fastify().register(fastifySessionFailover, shared)
app.get('/', async (request) => {
  request.session.user = { name: 'ann' }
  request.session.set('user', { name: 'bob' })
  request.session.set('undeclared', 42)
  const key: string = 'any'
  request.session.set(key, 1)
  put(request.session, 'user', { name: 'cy' })
  const name: string | undefined = request.session.get('user')?.name
  const cart: string[] | undefined = request.session.get<string[]>('cart')
  await app.sessionFailover.destroySession(request.session.sessionId)
  return { name, cart }
})
`,
    )
    expect(() => run('node', [tsc, ...args, 'typed-fastify.ts'], app)).not.toThrow()
    // The declared type is enforced, so it is the declaration that types the session, not an index signature:
    // by assignment and by set().
    writeFileSync(
      join(app, 'wrong-fastify.ts'),
      readFileSync(join(app, 'typed-fastify.ts'), 'utf8')
        .replace("user = { name: 'ann' }", 'user = 42')
        .replace("set('user', { name: 'bob' })", "set('user', 43)"),
    )
    const errors = (() => {
      try {
        run('node', [tsc, ...args, 'wrong-fastify.ts'], app)
        return ''
      } catch (error) {
        return String((error as { stdout?: string }).stdout)
      }
    })()
    const lines = readFileSync(join(app, 'wrong-fastify.ts'), 'utf8').split('\n')
    const lineOf = (text: string) => lines.findIndex((line) => line.includes(text)) + 1
    expect(errors).toContain(`wrong-fastify.ts(${lineOf('user = 42')},`)
    expect(errors).toContain(`wrong-fastify.ts(${lineOf("set('user', 43)")},`)
    expect(errors.match(/error TS/g)).toHaveLength(2)
    writeFileSync(
      join(app, 'wrong.ts'),
      `import { sessionFailover } from 'session-failover'\nsessionFailover({ nodes: 1 })\n`,
    )
    expect(() => run('node', [tsc, ...args, 'wrong.ts'], app)).toThrow()
    // Four runs of tsc: slow on a shared machine, and not what this test is about.
  }, 120_000)
})
