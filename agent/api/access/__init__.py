"""Who may do what, in one package.

- ``connguard``: connection cap, header deadline and size, shedding untrusted connections
- ``origin``: Host allow-list and Origin check (RequestGuard), the JSON refusal ``deny``
- ``audit``: the audit trail (middleware) and log (rings, file)
- ``gate``: authentication from the headers, body cap and deadline (AuthGate)
- ``principal``: who is asking (Principal, where the gate leaves it), the tokens
- ``scopes``: ``needs(scope)``, the dependency each route declares
- ``sessions``: browser sessions and stream tickets, with quotas
- ``logins``: the failed-login slow-down and the cap on logins in flight
- ``redact``: the logging filter that keeps credentials out of every line

Middleware order, outermost first: RequestDuration (metrics), RequestGuard, AuditTrail,
AuthGate, then the routes with their ``needs(...)``.
"""
