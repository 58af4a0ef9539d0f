"""All routes of the API."""

from fastapi import APIRouter

from service.api.routes import compare, health, jobs, logs

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(jobs.router)
api_router.include_router(logs.router)
api_router.include_router(compare.router)
