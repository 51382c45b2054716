// One app instance as its own process, so tests can SIGKILL or SIGTERM it. Options come as JSON in SF_OPTIONS;
// the port it listens on is printed as `LISTENING <port>`.
import express from 'express'
import type { SessionFailoverOptions } from '../../src/index.js'
import { startShop } from './app.js'

const options = JSON.parse(process.env.SF_OPTIONS ?? '{}') as SessionFailoverOptions
const shop = await startShop(express, options)
process.stdout.write(`LISTENING ${new URL(shop.url).port}\n`)
