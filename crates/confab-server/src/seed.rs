//! The demo tenants of SPEC §8, with their fixed ids. Idempotent: existing
//! rows are left alone.

use confab_core::model::{Email, NewOrg, NewUser, Role, Slug};
use confab_core::{OrgId, Store, StoreError, UserId};
use uuid::Uuid;

pub const ACME: Uuid = Uuid::from_u128(0x0000_0000_0000_0000_0000_0000_0000_0001);
pub const TECH_STARTUP: Uuid = Uuid::from_u128(0x0000_0000_0000_0000_0000_0000_0000_0002);
pub const ALICE: Uuid = Uuid::from_u128(0x0000_0000_0000_0000_0001_0000_0000_0001);
pub const BOB: Uuid = Uuid::from_u128(0x0000_0000_0000_0000_0001_0000_0000_0002);
pub const CHARLIE: Uuid = Uuid::from_u128(0x0000_0000_0000_0000_0002_0000_0000_0001);

/// Ignore "already there"; report everything else.
fn created(result: Result<impl Sized, StoreError>) -> Result<bool, StoreError> {
    match result {
        Ok(_) => Ok(true),
        Err(StoreError::Conflict { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

fn invalid(e: confab_core::model::Invalid) -> StoreError {
    StoreError::Other(e.0)
}

/// Create the demo orgs and users that are missing; returns how many rows were created.
pub async fn seed_demo(store: &dyn Store) -> Result<usize, StoreError> {
    let mut count = 0;
    for (id, name, slug) in [
        (ACME, "Acme Corp", "acme-corp"),
        (TECH_STARTUP, "Tech Startup Inc", "tech-startup"),
    ] {
        let org = NewOrg {
            id: OrgId::from_uuid(id),
            name: name.into(),
            slug: Slug::parse(slug).map_err(invalid)?,
            metadata: serde_json::json!({ "demo": true }),
        };
        count += usize::from(created(store.create_org(&org).await)?);
    }
    for (id, org, name, email, role) in [
        (ALICE, ACME, "Alice Admin", "admin@acme.com", Role::Admin),
        (BOB, ACME, "Bob User", "user@acme.com", Role::Member),
        (
            CHARLIE,
            TECH_STARTUP,
            "Charlie Founder",
            "founder@techstartup.com",
            Role::Owner,
        ),
    ] {
        let user = NewUser {
            id: UserId::from_uuid(id),
            org_id: OrgId::from_uuid(org),
            email: Email::parse(email).map_err(invalid)?,
            name: name.into(),
            role,
        };
        count += usize::from(created(store.create_user(&user).await)?);
    }
    Ok(count)
}
