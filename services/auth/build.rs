// `sqlx::migrate!` embeds the migration files at compile time; a new file must rebuild
// the crate (cargo tracks only files it was told about).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
