import express from 'express'
import { parseSessionId, type SessionFailoverMiddleware } from '../../src/index.js'

declare module 'express-session' {
  interface SessionData {
    cart: string[]
  }
}

/**
 * The node that holds a session's backup copy: the next alive node after its primary, in the configured order
 * (the rule the library writes backups by).
 */
function backupNodeOf(sessions: SessionFailoverMiddleware, primary: string | undefined): string | undefined {
  const nodes = sessions.health().nodes
  const at = nodes.findIndex((node) => node.id === primary)
  if (at === -1) return undefined
  for (let step = 1; step < nodes.length; step++) {
    const node = nodes[(at + step) % nodes.length]
    if (node?.alive) return node.id
  }
  return undefined
}

/** A small shop: the cart lives in the session. `instance` names the app instance that answered. */
export function createCartApp(sessions: SessionFailoverMiddleware, instance: string): express.Express {
  const app = express()
  app.disable('x-powered-by')
  app.use(sessions)

  const view = (req: express.Request) => {
    const node = parseSessionId(req.sessionID)?.nodeId
    return {
      instance,
      sessionId: req.sessionID,
      node,
      backupNode: backupNodeOf(sessions, node),
      cart: req.session.cart ?? [],
    }
  }

  app.get('/cart', (req, res) => {
    res.json(view(req))
  })
  app.post('/cart/:item', (req, res) => {
    req.session.cart = [...(req.session.cart ?? []), req.params.item]
    res.json(view(req))
  })
  app.get('/healthz', (_req, res) => {
    const health = sessions.health()
    res.status(health.ready ? 200 : 503).json(health)
  })
  // What the demo's live page shows; a real shop would not publish this.
  app.get('/stats', (_req, res) => {
    res.json({ instance, ...sessions.stats(), local: sessions.localStatus() ?? null })
  })
  return app
}
