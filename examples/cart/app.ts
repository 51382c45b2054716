import express from 'express'
import { parseSessionId, type SessionFailoverMiddleware } from '../../src/index.js'

declare module 'express-session' {
  interface SessionData {
    cart: string[]
  }
}

/** A small shop: the cart lives in the session. `instance` names the app instance that answered. */
export function createCartApp(sessions: SessionFailoverMiddleware, instance: string): express.Express {
  const app = express()
  app.use(sessions)

  const view = (req: express.Request) => ({
    instance,
    sessionId: req.sessionID,
    node: parseSessionId(req.sessionID)?.nodeId,
    cart: req.session.cart ?? [],
  })

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
  return app
}
