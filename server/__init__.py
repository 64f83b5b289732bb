"""The API process: FastAPI app (server.app), Redis records and job states (server.store), and the
`turbodiffusion serve` launcher. Never imports torch; server.store and the modules it uses import
neither FastAPI nor torch, so the workers share them."""
