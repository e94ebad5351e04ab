BEGIN TRANSACTION;
CREATE TABLE accounts (
	id INTEGER NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	api_key_hash VARCHAR(64), 
	floor BIGINT NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name), 
	UNIQUE (api_key_hash)
);
INSERT INTO "accounts" VALUES(1,'system:grants','system',NULL,-4611686018427387904,1.79621228145537662509e+09);
INSERT INTO "accounts" VALUES(2,'system:escrow','system',NULL,0,1.79621228145707821852e+09);
INSERT INTO "accounts" VALUES(3,'system:verification','system',NULL,0,1.79621228145823764801e+09);
INSERT INTO "accounts" VALUES(4,'anonymous','anonymous',NULL,-1000000000,1.79621228145919275285e+09);
INSERT INTO "accounts" VALUES(5,'alice','user','eb5f76cfa084dd9a45e141728f0785d9df090d42f8af89543f7a2c6a0a0893aa',0,1.79621228145992088316e+09);
INSERT INTO "accounts" VALUES(6,'bob','user','ba3647fc7d348009993bd3e45fa409bf96cbcda412225c265226c7d86e680ee7',0,1.7962122814627788067e+09);
INSERT INTO "accounts" VALUES(7,'carol','user','130317ee061efe10aab7dce21dfc8bf29ba5511efeff90e2377055b3fb7f457f',0,1.79621228146437597267e+09);
INSERT INTO "accounts" VALUES(8,'worker:aaaaaaaaaaaaaaaa','worker',NULL,0,1.79621228146559548371e+09);
INSERT INTO "accounts" VALUES(9,'pending:999930ca65a5411d82cc67fc7deed78b','pending',NULL,0,1.79621228146793246267e+09);
CREATE TABLE jobs (
	id VARCHAR(36) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	account_id INTEGER NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	params TEXT NOT NULL, 
	params_hash VARCHAR(64) NOT NULL, 
	model VARCHAR(128), 
	pixels INTEGER NOT NULL, 
	steps INTEGER NOT NULL, 
	n INTEGER NOT NULL, 
	cost BIGINT NOT NULL, 
	priority_class INTEGER NOT NULL, 
	created_at FLOAT NOT NULL, 
	worker_id VARCHAR(36), 
	lease_seconds FLOAT NOT NULL, 
	lease_deadline FLOAT, 
	attempts INTEGER NOT NULL, 
	image INTEGER NOT NULL, 
	step INTEGER NOT NULL, 
	steps_total INTEGER NOT NULL, 
	error TEXT, 
	finished_at FLOAT, 
	leased_at FLOAT, 
	verify_of VARCHAR(36), 
	shared INTEGER DEFAULT '0' NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(account_id) REFERENCES accounts (id), 
	FOREIGN KEY(worker_id) REFERENCES workers (id)
);
INSERT INTO "jobs" VALUES('6fea3417-5dad-4d50-af67-055a97b7cf49','image',5,'done','{"prompt":"a red cube","negative_prompt":"","width":64,"height":64,"steps":4,"cfg_scale":7.0,"sampler":"Euler a","seed":1,"n":1,"model":null}','6dc91801913f8e6c37b883708aa48a8409986b3ce055336ac77df0f7a936f1a8',NULL,4096,4,1,1,1,1.79621228147074246403e+09,'999930ca65a5411d82cc67fc7deed78b',60.125,NULL,0,0,0,4,NULL,1.79621228148202896112e+09,1.79621228147985506056e+09,NULL,0);
INSERT INTO "jobs" VALUES('00b01461-b568-4f86-ac4c-f9a8987637e2','image',6,'leased','{"prompt":"a red cube","negative_prompt":"","width":64,"height":64,"steps":4,"cfg_scale":7.0,"sampler":"Euler a","seed":2,"n":1,"model":null}','cab99bea3747f5bc408693f929d1ac8ef6005eee12a95da81265aae8cc67c312',NULL,4096,4,1,1,1,1.79621228147539687153e+09,'999930ca65a5411d82cc67fc7deed78b',60.125,1.79621234161451935771e+09,0,0,0,4,NULL,NULL,1.7962122814895193577e+09,NULL,0);
INSERT INTO "jobs" VALUES('172df8c8-43aa-41d4-8cfd-9e18fee7bea7','image',5,'cancelled','{"prompt":"a red cube","negative_prompt":"","width":64,"height":64,"steps":4,"cfg_scale":7.0,"sampler":"Euler a","seed":3,"n":1,"model":null}','5b8aa5243cdbec61b578857339dc42e02c76c4bd25943877561370759ff67b5f',NULL,4096,4,1,1,1,1.79621228149159455293e+09,NULL,60.125,NULL,0,0,0,4,'cancelled by the requester',1.79621228149423050875e+09,NULL,NULL,0);
INSERT INTO "jobs" VALUES('b2941ae8-209b-4d3c-b42b-25a3dc18a803','image',5,'queued','{"prompt":"a red cube","negative_prompt":"","width":64,"height":64,"steps":4,"cfg_scale":7.0,"sampler":"Euler a","seed":4,"n":1,"model":null}','52e190aa0528ab7a63b5b86e85b4d5a5c2a1098c3ad13a259efdf2deda13eba1',NULL,4096,4,1,1,1,1.79621228149799084658e+09,NULL,60.125,NULL,0,0,0,4,NULL,NULL,NULL,NULL,0);
INSERT INTO "jobs" VALUES('8215b602-1a00-4e5e-9ea0-9ed08e2fa1ae','image',5,'queued','{"prompt":"a red cube","negative_prompt":"","width":64,"height":64,"steps":4,"cfg_scale":7.0,"sampler":"Euler a","seed":5,"n":1,"model":null}','7d31f1e9e840269e153ae9a749bdb6b37542921eeacb72feda08cb547f1756f4',NULL,4096,4,1,1,1,1.7962122815010416508e+09,NULL,60.125,NULL,0,0,0,4,NULL,NULL,NULL,NULL,0);
INSERT INTO "jobs" VALUES('b8817a7d-7d29-45d5-ad18-8d0fde83b714','image',6,'queued','{"prompt":"a red cube","negative_prompt":"","width":64,"height":64,"steps":4,"cfg_scale":7.0,"sampler":"Euler a","seed":6,"n":1,"model":null}','1e8baf7ecf63b20a6bdea2f844a9ed300a237aa657e7b7898aaf3f6271d37e5c',NULL,4096,4,1,1,1,1.79621228150382375712e+09,NULL,60.125,NULL,0,0,0,4,NULL,NULL,NULL,NULL,0);
INSERT INTO "jobs" VALUES('7adfb9ae-998b-475f-8cc7-fbe9d5a38ac3','image',4,'queued','{"prompt":"a red cube","negative_prompt":"","width":64,"height":64,"steps":4,"cfg_scale":7.0,"sampler":"Euler a","seed":7,"n":1,"model":null}','4dd99bd0ccc364db699c69bd459588aa15c9cfcf2ba2d0dcb24403084c544af3',NULL,4096,4,1,1,0,1.79621228150653886794e+09,NULL,60.125,NULL,0,0,0,4,NULL,NULL,NULL,NULL,0);
CREATE TABLE ledger_entries (
	id INTEGER NOT NULL, 
	reason VARCHAR(32) NOT NULL, 
	job_id VARCHAR(36), 
	idempotency_key VARCHAR(128) NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (idempotency_key)
);
INSERT INTO "ledger_entries" VALUES(1,'grant',NULL,'grant:new-account:5',1.79621228146128821372e+09);
INSERT INTO "ledger_entries" VALUES(2,'grant',NULL,'grant:new-account:6',1.79621228146341156955e+09);
INSERT INTO "ledger_entries" VALUES(3,'grant',NULL,'grant:new-account:7',1.79621228146495676039e+09);
INSERT INTO "ledger_entries" VALUES(4,'reserve','6fea3417-5dad-4d50-af67-055a97b7cf49','reserve:6fea3417-5dad-4d50-af67-055a97b7cf49',1.79621228147216105463e+09);
INSERT INTO "ledger_entries" VALUES(5,'reserve','00b01461-b568-4f86-ac4c-f9a8987637e2','reserve:00b01461-b568-4f86-ac4c-f9a8987637e2',1.79621228147607660298e+09);
INSERT INTO "ledger_entries" VALUES(6,'settle','6fea3417-5dad-4d50-af67-055a97b7cf49','settle:6fea3417-5dad-4d50-af67-055a97b7cf49',1.79621228148680591582e+09);
INSERT INTO "ledger_entries" VALUES(7,'reserve','172df8c8-43aa-41d4-8cfd-9e18fee7bea7','reserve:172df8c8-43aa-41d4-8cfd-9e18fee7bea7',1.79621228149232196802e+09);
INSERT INTO "ledger_entries" VALUES(8,'refund','172df8c8-43aa-41d4-8cfd-9e18fee7bea7','refund:172df8c8-43aa-41d4-8cfd-9e18fee7bea7',1.79621228149610233306e+09);
INSERT INTO "ledger_entries" VALUES(9,'reserve','b2941ae8-209b-4d3c-b42b-25a3dc18a803','reserve:b2941ae8-209b-4d3c-b42b-25a3dc18a803',1.79621228149859309196e+09);
INSERT INTO "ledger_entries" VALUES(10,'reserve','8215b602-1a00-4e5e-9ea0-9ed08e2fa1ae','reserve:8215b602-1a00-4e5e-9ea0-9ed08e2fa1ae',1.7962122815016155243e+09);
INSERT INTO "ledger_entries" VALUES(11,'reserve','b8817a7d-7d29-45d5-ad18-8d0fde83b714','reserve:b8817a7d-7d29-45d5-ad18-8d0fde83b714',1.79621228150447487833e+09);
INSERT INTO "ledger_entries" VALUES(12,'reserve','7adfb9ae-998b-475f-8cc7-fbe9d5a38ac3','reserve:7adfb9ae-998b-475f-8cc7-fbe9d5a38ac3',1.79621228150710082055e+09);
INSERT INTO "ledger_entries" VALUES(13,'transfer',NULL,'transfer:6:transfer-1',1.79621228151064252849e+09);
CREATE TABLE postings (
	id INTEGER NOT NULL, 
	entry_id INTEGER NOT NULL, 
	account_id INTEGER NOT NULL, 
	amount BIGINT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(entry_id) REFERENCES ledger_entries (id), 
	FOREIGN KEY(account_id) REFERENCES accounts (id)
);
INSERT INTO "postings" VALUES(1,1,1,-100);
INSERT INTO "postings" VALUES(2,1,5,100);
INSERT INTO "postings" VALUES(3,2,1,-100);
INSERT INTO "postings" VALUES(4,2,6,100);
INSERT INTO "postings" VALUES(5,3,1,-100);
INSERT INTO "postings" VALUES(6,3,7,100);
INSERT INTO "postings" VALUES(7,4,5,-1);
INSERT INTO "postings" VALUES(8,4,2,1);
INSERT INTO "postings" VALUES(9,5,6,-1);
INSERT INTO "postings" VALUES(10,5,2,1);
INSERT INTO "postings" VALUES(11,6,2,-1);
INSERT INTO "postings" VALUES(12,6,8,1);
INSERT INTO "postings" VALUES(13,7,5,-1);
INSERT INTO "postings" VALUES(14,7,2,1);
INSERT INTO "postings" VALUES(15,8,2,-1);
INSERT INTO "postings" VALUES(16,8,5,1);
INSERT INTO "postings" VALUES(17,9,5,-1);
INSERT INTO "postings" VALUES(18,9,2,1);
INSERT INTO "postings" VALUES(19,10,5,-1);
INSERT INTO "postings" VALUES(20,10,2,1);
INSERT INTO "postings" VALUES(21,11,6,-1);
INSERT INTO "postings" VALUES(22,11,2,1);
INSERT INTO "postings" VALUES(23,12,4,-1);
INSERT INTO "postings" VALUES(24,12,2,1);
INSERT INTO "postings" VALUES(25,13,6,-5);
INSERT INTO "postings" VALUES(26,13,5,5);
CREATE TABLE ratings (
	job_id VARCHAR(36) NOT NULL, 
	idx INTEGER NOT NULL, 
	account_id INTEGER NOT NULL, 
	score INTEGER NOT NULL, 
	worker_id VARCHAR(36), 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (job_id, idx, account_id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id), 
	FOREIGN KEY(account_id) REFERENCES accounts (id), 
	FOREIGN KEY(worker_id) REFERENCES workers (id)
);
CREATE TABLE request_keys (
	account_id INTEGER NOT NULL, 
	"key" VARCHAR(128) NOT NULL, 
	request_hash VARCHAR(64) NOT NULL, 
	response TEXT NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (account_id, "key"), 
	FOREIGN KEY(account_id) REFERENCES accounts (id)
);
INSERT INTO "request_keys" VALUES(6,'transfer-1','d35ee37025fcb1349cbc053f9bcd5c807d02689bfa99e5cbb3ab67abc815e630','{"id":13,"to":"alice","amount":5,"idempotency_key":"transfer-1"}',1.79621228151112937929e+09);
CREATE TABLE results (
	job_id VARCHAR(36) NOT NULL, 
	idx INTEGER NOT NULL, 
	seed BIGINT NOT NULL, 
	sha256 VARCHAR(64) NOT NULL, 
	signature VARCHAR(128) NOT NULL, 
	worker_id VARCHAR(36) NOT NULL, 
	PRIMARY KEY (job_id, idx), 
	UNIQUE (job_id, idx), 
	FOREIGN KEY(job_id) REFERENCES jobs (id), 
	FOREIGN KEY(worker_id) REFERENCES workers (id)
);
INSERT INTO "results" VALUES('6fea3417-5dad-4d50-af67-055a97b7cf49',0,1,'0000000000000000000000000000000000000000000000000000000000000000','00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000','999930ca65a5411d82cc67fc7deed78b');
CREATE TABLE schema_version (
	version INTEGER NOT NULL, 
	PRIMARY KEY (version)
);
INSERT INTO "schema_version" VALUES(1);
INSERT INTO "schema_version" VALUES(2);
INSERT INTO "schema_version" VALUES(3);
CREATE TABLE text_models (
	name VARCHAR(128) NOT NULL, 
	blocks INTEGER NOT NULL, 
	parameters BIGINT NOT NULL, 
	max_context INTEGER NOT NULL, 
	last_seen FLOAT NOT NULL, 
	PRIMARY KEY (name)
);
CREATE TABLE text_outputs (
	job_id VARCHAR(36) NOT NULL, 
	model VARCHAR(128) NOT NULL, 
	text TEXT NOT NULL, 
	finish_reason VARCHAR(16), 
	prompt_tokens INTEGER NOT NULL, 
	completion_tokens INTEGER NOT NULL, 
	spans TEXT, 
	charged BIGINT, 
	signature VARCHAR(128), 
	PRIMARY KEY (job_id), 
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE TABLE worker_peers (
	peer_id VARCHAR(128) NOT NULL, 
	worker_id VARCHAR(36) NOT NULL, 
	linked_at FLOAT NOT NULL, 
	PRIMARY KEY (peer_id), 
	FOREIGN KEY(worker_id) REFERENCES workers (id)
);
CREATE TABLE workers (
	id VARCHAR(36) NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	public_key VARCHAR(64) NOT NULL, 
	token_hash VARCHAR(64) NOT NULL, 
	account_id INTEGER NOT NULL, 
	created_at FLOAT NOT NULL, 
	last_seen FLOAT NOT NULL, 
	trusted INTEGER DEFAULT '0' NOT NULL, 
	suspicion INTEGER DEFAULT '0' NOT NULL, 
	paused INTEGER DEFAULT '0' NOT NULL, 
	pause_reason TEXT, 
	checks_passed INTEGER DEFAULT '0' NOT NULL, 
	checks_failed INTEGER DEFAULT '0' NOT NULL, 
	jobs_done INTEGER DEFAULT '0' NOT NULL, 
	engine TEXT, 
	online_since FLOAT, 
	PRIMARY KEY (id), 
	UNIQUE (public_key), 
	UNIQUE (token_hash), 
	FOREIGN KEY(account_id) REFERENCES accounts (id)
);
INSERT INTO "workers" VALUES('999930ca65a5411d82cc67fc7deed78b','w1','aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa','30cd5bf5b8398a4d6f262fc866db8d13a15fd8430f593a8833c2897a24ab3366',8,1.79621228146559548371e+09,1.7962122814895193577e+09,0,0,0,NULL,0,0,1,NULL,NULL);
CREATE INDEX ix_postings_account ON postings (account_id);
CREATE INDEX ix_jobs_account ON jobs (account_id);
CREATE INDEX ix_jobs_state ON jobs (state, created_at);
CREATE INDEX ix_ratings_worker ON ratings (worker_id);
COMMIT;
