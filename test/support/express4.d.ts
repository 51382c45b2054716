// The `express4` dev dependency is express@4 installed under an alias; its API is typed like express.
declare module 'express4' {
  import express from 'express'
  export default express
}
