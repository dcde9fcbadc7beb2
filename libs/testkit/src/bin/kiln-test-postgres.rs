//! Starts one throwaway PostgreSQL cluster for a whole test run: prints its admin URL
//! on stdout, then keeps it until its stdin closes. `make test` runs it and exports
//! the URL as `KILN_TEST_POSTGRES_URL`, so nextest's process per test does not start a
//! cluster each.

use std::io::Read;

fn main() {
    match kiln_testkit::Cluster::start() {
        Ok(cluster) => {
            println!("{}", cluster.admin_url());
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            drop(cluster);
        }
        Err(why) => {
            eprintln!("kiln-test-postgres: {why}");
            std::process::exit(1);
        }
    }
}
