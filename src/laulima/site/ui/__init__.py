"""The site dashboard: a hospital administrator's pages, served by ``laulima site ui`` on loopback.

Pending jobs with their manifest and source, approve / reject with a reason, the datasets and
their checks, the privacy budget left, and the audit trail with its verification. The pages
are server-rendered with the layout, sessions and CSRF of :mod:`laulima.web`; the data comes
from the site's own stores (:mod:`laulima.site.ui.views`), decisions go through
:func:`laulima.site.review.decide_job` as the commands' do, and sign-in uses named dashboard
tokens (:mod:`laulima.site.ui.tokens`). Nothing here talks to the hub.

- ``app.py``     the FastAPI app: routes, sign-in, the decisions
- ``views.py``   what the pages show, read from the site's stores
- ``tokens.py``  the dashboard's credentials (``home/ui-tokens.json``, hashed)
- ``server.py``  uvicorn on a loopback address, the first token printed once
"""
