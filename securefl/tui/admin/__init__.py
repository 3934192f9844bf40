"""The administrator's app: live dashboard, aggregate, close enrolment, abort, history, audit."""
